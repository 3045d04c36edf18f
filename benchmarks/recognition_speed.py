"""Recognition throughput: the unified model (every task of a document in one forward pass) against one
single-task model per task (same encoder size), on the same images, in one run.

    .venv/bin/python -m benchmarks.recognition_speed [--images 32] [--batch 8] [--doc_type ald_id_card]

Both sides run ``predict_step`` (forward + postprocess) on the same normalised batches; models are randomly
initialised (speed does not depend on the weights). The two sides alternate batch by batch for ``--repeats``
rounds and each side's median is kept, so load from other processes hits both alike; besides wall-clock
images/s, images per CPU-second of this process are reported (steadier on a shared machine). Prints the
speed-ups against the issue's target of (T - 1)x for the T tasks of the document type.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import make_random_batch
from idrecog.lit.unified import UnifiedModule
from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.tasks.catalogue import TaskCatalogue, default_catalogue


def build(catalogue: TaskCatalogue, img_size: tuple[int, int], encoder: str) -> UnifiedModule:
    return UnifiedModule(
        catalogue=catalogue.to_dict(),
        encoder=ViTEncoder(encoder, img_size=img_size),
        decoder=TaskDecoder(dim=192),
    ).eval()


@torch.inference_mode()
def run_side(modules: list[UnifiedModule], batches: list[dict]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for every model of a side over ``batches``."""
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        for m in modules:  # every model sees the image: all tasks of the document are answered
            m.predict_step(b, 0)
    return time.perf_counter() - t0, time.process_time() - c0


def compare(sides: dict[str, list[UnifiedModule]], batches: list[dict], repeats: int) -> dict[str, dict]:
    """Alternate the sides ``repeats`` times after one warm-up round; medians of wall and CPU time."""
    for mods in sides.values():
        run_side(mods, batches[:1])
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    for _ in range(repeats):
        for k, mods in sides.items():
            times[k].append(run_side(mods, batches))
    n = sum(b["image"].shape[0] for b in batches)
    return {
        k: {
            "images_per_s": n / statistics.median(w for w, _ in v),
            "images_per_cpu_s": n / statistics.median(c for _, c in v),
        }
        for k, v in times.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img_size", type=int, nargs=2, default=[160, 256])
    p.add_argument("--encoder", default="vit_tiny_patch16_224")
    p.add_argument("--doc_type", default="ald_id_card")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (medians)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = default_catalogue()
    names = full.tasks_for(args.doc_type)
    cat = TaskCatalogue(tasks=[full[n] for n in names], source=f"{args.doc_type} tasks")
    size = (args.img_size[0], args.img_size[1])
    g = torch.Generator().manual_seed(0)
    batches = [
        make_random_batch(cat, args.batch, size, generator=g)
        for _ in range(max(1, args.images // args.batch))
    ]
    for b in batches:
        b.pop("targets")
    unified = build(cat, size, args.encoder)
    singles = [build(TaskCatalogue(tasks=[spec], source=spec.name), size, args.encoder) for spec in cat.tasks]
    r = compare({"unified": [unified], "separate": singles}, batches, args.repeats)
    u, s = r["unified"], r["separate"]
    t = len(cat)
    speedup = u["images_per_s"] / s["images_per_s"]
    res = {
        "tasks": t,
        "unified_images_per_s": round(u["images_per_s"], 2),
        "separate_images_per_s": round(s["images_per_s"], 2),
        "speedup": round(speedup, 2),
        "speedup_cpu_time": round(u["images_per_cpu_s"] / s["images_per_cpu_s"], 2),
        "target_speedup": t - 1,
        "meets_target": speedup >= t - 1,
        "images": sum(b["image"].shape[0] for b in batches),
        "batch": args.batch,
        "img_size": list(size),
        "encoder": args.encoder,
        "threads": args.threads,
        "repeats": args.repeats,
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
