"""MAE pretraining step throughput: visible-only encoder (MAE) vs all-patches encoder (SimMIM-style baseline).

One training step = forward + backward + AdamW step, random images, mask ratio 0.75. Both modes share the same
encoder and decoder sizes; only what the encoder sees differs. The two modes are timed side by side (alternating,
after a warm-up step each) and the median step time is reported, so machine load affects both alike.

    .venv/bin/python -m benchmarks.mae_speed                 # CPU, batch 32: tiny default, ViT-S/16, decoder sweep
    .venv/bin/python -m benchmarks.mae_speed --device cuda --batch_size 128 --amp --models tiny,small,base

Prints a Markdown table and the speed-ups (visible / all images per second), beside the FLOP ratio of the two
steps (forward + backward FLOPs counted with ``torch.utils.flop_counter``): the speed-up the step would reach if
time followed FLOPs. The patch embedding and the decoder run on every patch in both modes, so that ratio, not
the 4x of the encoder alone, is the ceiling a lighter encoder share can give.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from idrecog.models.encoder import ViTEncoder
from idrecog.models.mae import MaskedAutoencoder, default_decoder_size


class AllPatchesMAE(MaskedAutoencoder):
    """The SimMIM-style baseline: the encoder sees every patch, a learned mask token substituted for the patch
    embedding at removed positions (before the position embeddings); the same decoder predicts the pixels."""

    def __init__(self, encoder: ViTEncoder, **kwargs: object) -> None:
        super().__init__(encoder, **kwargs)  # type: ignore[arg-type]
        self.enc_mask_token = torch.nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        torch.nn.init.normal_(self.enc_mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"enc_mask_token"}

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, 3, H, W] -> latent [N, P + L, D] (every patch), mask [N, L], ids_restore [N, L]."""
        n = imgs.shape[0]
        _, mask, ids_restore = self.random_ids(n, self.num_patches, mask_ratio, imgs.device, generator)
        x = self.encoder.vit.patch_embed(imgs)  # [N, L, D]
        m = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - m) + self.enc_mask_token.to(x.dtype) * m
        x = torch.cat([self.encoder.prefix_tokens(n), x + self.encoder.patch_pos_embed()], dim=1)
        return self.encoder.forward_tokens(x), mask, ids_restore


MODELS = {
    # the default encoder (idrecog/configs/pretrain_mae.yaml and unified.yaml)
    "tiny": {"name": "vit_tiny_patch16_224", "depth": 4},
    "small": {"name": "vit_small_patch16_224", "depth": None},
    "base": {"name": "vit_base_patch16_224", "depth": None},
    "large": {"name": "vit_large_patch16_224", "depth": None},
}
WIDTHS = {"tiny": 192, "small": 384, "base": 768, "large": 1024}


@dataclass
class Case:
    model: str
    decoder_depth: int | None = None  # None: sized to the encoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(
    case: Case, mode: str, img_size: tuple[int, int], device: torch.device
) -> tuple[MaskedAutoencoder, torch.optim.Optimizer]:
    torch.manual_seed(0)
    spec = MODELS[case.model]
    enc = ViTEncoder(spec["name"], img_size=img_size, depth=spec["depth"])
    cls = MaskedAutoencoder if mode == "visible" else AllPatchesMAE
    mae = cls(enc, mask_ratio=0.75, decoder_depth=case.decoder_depth).to(device)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-4, fused=device.type == "cuda")
    return mae, opt


def step(
    mae: MaskedAutoencoder, opt: torch.optim.Optimizer, imgs: torch.Tensor, amp: bool
) -> tuple[float, float]:
    """One training step -> (wall seconds, this process's CPU seconds)."""
    _sync(imgs.device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=amp):
        loss, _, _ = mae(imgs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _sync(imgs.device)
    return time.perf_counter() - t0, time.process_time() - c0


def step_flops(mae: MaskedAutoencoder, imgs: torch.Tensor) -> int:
    """FLOPs of one forward + backward (the optimiser step is elementwise and not counted). Attention runs on the
    math backend here: the counter has no formula for the CPU flash kernel and would leave attention out."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        loss, _, _ = mae(imgs)
        loss.backward()
    mae.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    img_size = tuple(args.img_size)
    imgs = torch.randn(args.batch_size, 3, *img_size, device=device)
    runs = {m: build(case, m, img_size, device) for m in ("visible", "all")}  # type: ignore[arg-type]
    flops = {m: step_flops(mae, imgs) for m, (mae, _) in runs.items()}
    wall: dict[str, list[float]] = {m: [] for m in runs}
    cpu: dict[str, list[float]] = {m: [] for m in runs}
    for mae, opt in runs.values():
        for _ in range(args.warmup):
            step(mae, opt, imgs, args.amp)
    for _ in range(args.repeats):  # alternate, so both modes see the same machine load
        for m, (mae, opt) in runs.items():
            w, c = step(mae, opt, imgs, args.amp)
            wall[m].append(w)
            cpu[m].append(c)
    out: dict[str, float] = {}
    for m in runs:
        out[f"{m}_ips"] = args.batch_size / statistics.median(wall[m])
        # images per CPU-second: on a shared CPU this is steadier than wall time (it ignores time spent waiting)
        out[f"{m}_cpu_ips"] = args.batch_size / statistics.median(cpu[m])
    out["speedup"] = out["visible_ips"] / out["all_ips"]
    out["flop_ratio"] = flops["all"] / flops["visible"]
    out["visible_gflop_per_image"] = flops["visible"] / args.batch_size / 1e9
    out["cpu_speedup"] = out["visible_cpu_ips"] / out["all_cpu_ips"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch_size", type=int, default=32, help="idrecog/configs/pretrain_mae.yaml: 32")
    ap.add_argument("--img_size", type=int, nargs=2, default=(160, 256), metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default, every core; 1 is steadier on shared cores)",
    )
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--models", default="tiny,small", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument(
        "--decoder_depths", default="1,2,4,8", help="decoder depth sweep on the first model ('' to skip)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = [m for m in args.models.split(",") if m]
    cases = [Case(m) for m in models]
    depths = [int(d) for d in args.decoder_depths.split(",") if d]
    first_default = default_decoder_size(WIDTHS[models[0]])[1]
    cases += [Case(models[0], d) for d in depths if d != first_default]

    # one untimed step first: thread pools, allocator and kernels start cold on the first model otherwise
    mae, opt = build(Case(models[0]), "visible", tuple(args.img_size), device)
    step(mae, opt, torch.randn(args.batch_size, 3, *args.img_size, device=device), args.amp)
    del mae, opt

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"# MAE step throughput, {datetime.date.today()}, {where}, {platform.python_implementation()} "
        f"torch {torch.__version__}; batch {args.batch_size}, {args.img_size[0]}x{args.img_size[1]}, mask 0.75, "
        f"median of {args.repeats}{', bf16' if args.amp else ''}\n"
    )
    cpu_cols = device.type == "cpu"
    head = (
        "| encoder | decoder (dim x depth) | visible GFLOP/img (fwd+bwd) | FLOP ratio (ceiling) "
        "| visible-only img/s | all patches img/s | speed-up |"
    )
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if cpu_cols:
        head += " visible img/CPU-s | all img/CPU-s | speed-up (CPU time) |"
        rule += "---:|---:|---:|"
    print(head)
    print(rule)
    results = []
    for case in cases:
        spec = MODELS[case.model]
        dim = WIDTHS[case.model]
        ddim, ddepth, _ = default_decoder_size(dim)
        ddepth = case.decoder_depth if case.decoder_depth is not None else ddepth
        r = measure(case, args, device)
        results.append((case, r))
        label = spec["name"] + (f" (depth {spec['depth']})" if spec["depth"] else "")
        row = (
            f"| {label} | {ddim} x {ddepth} | {r['visible_gflop_per_image']:.2f} | {r['flop_ratio']:.2f}x "
            f"| {r['visible_ips']:.1f} | {r['all_ips']:.1f} | {r['speedup']:.2f}x |"
        )
        if cpu_cols:
            row += f" {r['visible_cpu_ips']:.1f} | {r['all_cpu_ips']:.1f} | {r['cpu_speedup']:.2f}x |"
        print(row, flush=True)
    print()
    for case, r in results:
        extra = f" (CPU time: {r['cpu_speedup']:.2f})" if cpu_cols else ""
        print(
            f"ratio visible/all {case.model} decoder_depth={case.decoder_depth or 'default'}: {r['speedup']:.2f}{extra}"
            f" (FLOP ceiling {r['flop_ratio']:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
