"""GPU check: images/s and model FLOPs utilisation (MFU) of ViT-B/16 MAE pretraining and unified training steps,
eager and ``torch.compile``, bf16 autocast, fused AdamW, SDPA attention (flash kernels).

    bash benchmarks/gpu_check.sh            # on a GPU machine; prints a Markdown table
    python -m benchmarks.gpu_check --tiny   # CPU smoke run of the same code with a tiny ViT

FLOPs of one training step (forward + backward) are counted with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls and attention); the optimiser's elementwise work is not counted. MFU = counted FLOPs per step x steps/s /
the device's peak dense bf16 FLOP/s (looked up from the device name; override with --peak-tflops).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import make_random_batch
from idrecog.lit.optim import make_adamw
from idrecog.models.encoder import ViTEncoder
from idrecog.models.mae import MaskedAutoencoder
from idrecog.tasks.catalogue import default_catalogue

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s
PEAKS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(override: float | None) -> float:
    if override:
        return override
    if not torch.cuda.is_available():
        return float("nan")
    name = torch.cuda.get_device_name()
    for key, val in PEAKS.items():
        if key in name:
            return val
    return float("nan")


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def set_sdpa_backend(name: str) -> None:
    """Enable one scaled-dot-product-attention backend only ("default": PyTorch's own priority order)."""
    b = torch.backends.cuda
    on = {k: name in ("default", k) for k in SDPA_BACKENDS}
    b.enable_flash_sdp(on["flash"])
    b.enable_mem_efficient_sdp(on["efficient"])
    b.enable_cudnn_sdp(on["cudnn"])
    b.enable_math_sdp(on["math"])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mae_setup(args, device):
    name, size = ("vit_tiny_patch16_224", (64, 96)) if args.tiny else ("vit_base_patch16_224", (224, 224))
    kw = {"depth": 2} if args.tiny else {}
    model = MaskedAutoencoder(
        ViTEncoder(name, img_size=size, **kw), mask_ratio=0.75, decoder_heads=args.mae_decoder_heads
    ).to(device)
    imgs = torch.randn(args.mae_batch, 3, *size, device=device)

    def loss_fn(m):
        return m(imgs)[0]

    return model, loss_fn, args.mae_batch


def unified_setup(args, device):
    from idrecog.lit.unified import UnifiedModule
    from idrecog.models.decoder import TaskDecoder

    cat = default_catalogue()
    if args.tiny:
        enc, size, dec = (
            ViTEncoder("vit_tiny_patch16_224", img_size=(64, 96), depth=2),
            (64, 96),
            TaskDecoder(dim=64),
        )
    else:
        enc, size = ViTEncoder("vit_base_patch16_224", img_size=(224, 352)), (224, 352)
        dec = TaskDecoder(dim=384, depth=4, num_heads=8)
    module = UnifiedModule(
        catalogue=cat.to_dict(), encoder=enc, decoder=dec, task_options={"detection": {"num_queries": 32}}
    )
    model = module.to(device).model  # the balancer (in compute_losses) moves with it
    batch = make_random_batch(cat, args.unified_batch, size, device=device)

    def loss_fn(m):
        return module.compute_losses(m(batch["image"], batch=batch), batch)[0]

    return model, loss_fn, args.unified_batch


def pick_sdpa(kind: str, args, device) -> tuple[str, dict[str, float]]:
    """Time a few eager training steps of ``kind`` with each attention backend alone; return the fastest.

    Short sequences (50 visible tokens in MAE's encoder, 32-wide heads in its decoder) are where the backends differ
    most, so the choice is measured on the model's own shapes rather than assumed."""
    torch.manual_seed(0)
    model, loss_fn, _ = (mae_setup if kind == "mae" else unified_setup)(args, device)
    model.train()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times: dict[str, float] = {}
    for name in ("default", *SDPA_BACKENDS):
        set_sdpa_backend(name)
        try:
            for i in range(2 + args.sdpa_steps):
                if i == 2:
                    sync()
                    t = time.perf_counter()
                with amp:
                    loss = loss_fn(model)
                loss.backward()
                model.zero_grad(set_to_none=True)
            sync()
            times[name] = (time.perf_counter() - t) / args.sdpa_steps * 1e3
        except Exception as e:  # a backend may not support a shape or dtype: skip it
            print(f"sdpa {kind}/{name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    set_sdpa_backend("default")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    best = min(times, key=times.get)
    print(
        f"sdpa {kind}: eager ms/step (forward + backward) "
        + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
    )
    return best, times


def flops_by_module(fc: FlopCounterMode) -> str:
    """Counted FLOPs by top-level submodule (where the work is, beside where the time is). Each module's own FLOPs
    (its count less its children's) go to its top-level ancestor, so the shares add up to 100 %."""
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items() if k != "Global"}
    total = max(counts.values(), default=0) or 1
    own = dict(counts)
    for name, f in counts.items():  # the nearest counted ancestor (not every level is called as a module)
        parts = name.split(".")
        parent = next((p for i in range(len(parts) - 1, 0, -1) if (p := ".".join(parts[:i])) in counts), None)
        if parent is not None:
            own[parent] -= f
    groups: dict[str, int] = {}
    for name, f in own.items():
        parts = name.split(".")
        key = parts[1] if len(parts) > 1 else "(root)"
        groups[key] = groups.get(key, 0) + f
    rows = sorted(((f, k) for k, f in groups.items() if f), reverse=True)
    return ", ".join(f"{k} {f / total:.1%}" for f, k in rows)


def run_one(kind: str, compile_mode: str | None, args, device) -> dict:
    """One timed job; ``compile_mode`` None runs eager, "default" plain ``torch.compile``, or any other mode name
    ("reduce-overhead": CUDA graphs, "max-autotune-no-cudagraphs")."""
    compiled = compile_mode is not None
    torch.manual_seed(0)
    model, loss_fn, bsz = (mae_setup if kind == "mae" else unified_setup)(args, device)
    model.train()
    opt = make_adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], 1e-4, None)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # FLOPs of one eager step (forward + backward)
    with FlopCounterMode(display=False) as fc:
        with amp:
            loss = loss_fn(model)
        loss.backward()
    flops = fc.get_total_flops()
    # the split by module from a forward pass alone: the counter's module tracking is unreliable in backward
    with torch.no_grad(), FlopCounterMode(display=False) as fwd, amp:
        loss_fn(model)
    print(f"{kind}: forward FLOPs by module: {flops_by_module(fwd)}", flush=True)
    opt.zero_grad(set_to_none=True)

    runner = model
    if compiled:
        runner = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)

    def step():
        with amp:
            loss = loss_fn(runner)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        times.append((time.perf_counter() - t) / args.steps)
    per_step = statistics.median(times)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync()
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
            sync()
        wall_us = (time.perf_counter() - t) * 1e6
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        print(f"--- profile {kind}/{compile_mode or 'eager'} (3 steps), top ops by {key}")
        print(averages.table(sort_by=key, row_limit=args.profile))
        if device.type == "cuda":
            # GPU-busy share: the kernels' own time against the wall time of the profiled steps (one stream);
            # what is missing is the GPU waiting on the CPU (launches, the Hungarian matcher's sync)
            from torch.autograd import DeviceType

            # kernel events only: the operator rows above repeat their kernels' time
            busy = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
            print(
                f"--- {kind}: GPU busy {busy / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall ({busy / wall_us:.1%})"
            )
    peak = peak_tflops(args.peak_tflops)
    mfu = flops / per_step / (peak * 1e12) if peak == peak else float("nan")
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {
        "job": kind,
        "compile": compile_mode or "no",
        "batch": bsz,
        "ms_step": per_step * 1e3,
        "img_s": bsz / per_step,
        "tflop_step": flops / 1e12,
        "mfu": mfu,
        "warmup_s": warm_s,
        "mem_gib": mem,
        "sdpa": args.current_sdpa,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny ViT at 64x96 (CPU smoke run)")
    ap.add_argument("--mae-batch", type=int, default=256)
    ap.add_argument("--unified-batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", default="mae,unified")
    ap.add_argument(
        "--modes",
        default="eager,compile",
        help="comma list of eager, compile, compile:MODE (a torch.compile mode, e.g. compile:reduce-overhead)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument(
        "--sdpa",
        default="auto",
        choices=("auto", "default", *SDPA_BACKENDS),
        help="attention backend: auto times each on the model's shapes and keeps the fastest (CUDA only)",
    )
    ap.add_argument("--sdpa-steps", type=int, default=4, help="eager steps timed per backend by --sdpa auto")
    ap.add_argument(
        "--mae-decoder-heads",
        type=int,
        default=None,
        help="MAE decoder heads (default: 16 at 512 wide, MAE's)",
    )
    ap.add_argument(
        "--profile", type=int, default=0, help="print the N most expensive ops of 3 profiled steps"
    )
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(
            f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, peak {peak_tflops(args.peak_tflops)} TFLOP/s bf16"
        )
    else:
        print(f"device: cpu, torch {torch.__version__} (MFU not defined)")
    rows = []
    for job in args.jobs.split(","):
        args.current_sdpa = "default"
        if device.type == "cuda" and args.sdpa != "default":
            args.current_sdpa = pick_sdpa(job, args, device)[0] if args.sdpa == "auto" else args.sdpa
            set_sdpa_backend(args.current_sdpa)
            print(f"{job}: attention backend {args.current_sdpa}", flush=True)
        for mode in args.modes.split(","):
            cmode = None if mode == "eager" else (mode.split(":", 1)[1] if ":" in mode else "default")
            try:
                r = run_one(job, cmode, args, device)
            except Exception as e:  # keep going: one failing mode must not hide the others' figures
                print(f"{job}/{mode}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                continue
            rows.append(r)
            print(f"{job}/{mode}: {r}", flush=True)
    print(
        "\n| job | compile | attention | batch | ms/step | images/s | TFLOP/step | MFU | warm-up s | peak mem GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['job']} | {r['compile']} | {r['sdpa']} | {r['batch']} | {r['ms_step']:.1f} | {r['img_s']:.0f} | "
            f"{r['tflop_step']:.2f} | {r['mfu']:.1%} | {r['warmup_s']:.0f} | {r['mem_gib']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
