"""Recognition throughput: the unified model (every task of a document in one forward pass) against one
single-task model per task (same encoder size), on the same images, in one run.

    .venv/bin/python benchmarks/recognition_speed.py [--images 32] [--batch 8] [--doc_type ald_id_card]

Both sides run ``predict_step`` (forward + postprocess) on the same normalised batches; models are randomly
initialised (speed does not depend on the weights). Prints images/s for each side and the speed-up, against the
issue's target of (T - 1)x for the T tasks of the document type.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from idrecog.data.catalogue import TaskCatalogue, default_catalogue
from idrecog.lit.unified import UnifiedModule
from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.testing import make_random_batch


def build(catalogue: TaskCatalogue, img_size: tuple[int, int], encoder: str) -> UnifiedModule:
    return UnifiedModule(
        catalogue=catalogue.to_dict(),
        encoder=ViTEncoder(encoder, img_size=img_size),
        decoder=TaskDecoder(dim=192),
    ).eval()


@torch.inference_mode()
def images_per_second(modules: list[UnifiedModule], batches: list[dict], warmup: int = 1) -> float:
    for m in modules:
        for b in batches[:warmup]:
            m.predict_step(b, 0)
    n = sum(b["image"].shape[0] for b in batches)
    t0 = time.perf_counter()
    for b in batches:
        for m in modules:  # every model sees the image: all tasks of the document are answered
            m.predict_step(b, 0)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img_size", type=int, nargs=2, default=[160, 256])
    p.add_argument("--encoder", default="vit_tiny_patch16_224")
    p.add_argument("--doc_type", default="ald_id_card")
    p.add_argument("--threads", type=int, default=2)
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
    u = images_per_second([unified], batches)
    s = images_per_second(singles, batches)
    t = len(cat)
    res = {
        "tasks": t,
        "unified_images_per_s": round(u, 2),
        "separate_images_per_s": round(s, 2),
        "speedup": round(u / s, 2),
        "target_speedup": t - 1,
        "meets_target": u / s >= t - 1,
        "images": sum(b["image"].shape[0] for b in batches),
        "batch": args.batch,
        "img_size": list(size),
        "encoder": args.encoder,
        "threads": args.threads,
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
