"""Trivial baselines of the synthetic benchmark, scored with the same task types and metrics as the model.

Each task gets the constant answer a model with no image information would give: the training split's majority
class (classification), the training split's mean value (regression), every pixel the training split's majority
pixel class (segmentation) and no boxes at all (detection). These are the floor the unified model must clear
(docs/results.md puts them beside its test metrics).

    python -m benchmarks.baselines [--root data/synthetic] [--split test]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from idrecog.data.datamodule import IdDataModule
from idrecog.tasks.registry import create_task_type


def train_statistics(dm: IdDataModule) -> dict[str, object]:
    """Majority class / mean value / majority pixel class of each task over the labelled training samples."""
    stats: dict[str, object] = {}
    cat = dm.catalogue
    counts: dict[str, Counter] = {t.name: Counter() for t in cat.tasks}
    values: dict[str, list[float]] = {t.name: [] for t in cat.tasks}
    for batch in dm.train_dataloader():
        for i, spec in enumerate(cat.tasks):
            present = batch["present"][:, i]
            target = batch["targets"][spec.name]
            if spec.type == "classification":
                counts[spec.name].update(target[present].tolist())
            elif spec.type == "regression":
                values[spec.name] += target[present].tolist()
            elif spec.type == "segmentation":
                m = target[present]
                counts[spec.name].update(m[m != 255].flatten().tolist())
    for spec in cat.tasks:
        if spec.type in ("classification", "segmentation"):
            stats[spec.name] = counts[spec.name].most_common(1)[0][0] if counts[spec.name] else 0
        elif spec.type == "regression":
            stats[spec.name] = sum(values[spec.name]) / max(1, len(values[spec.name]))
    return stats


def constant_outputs(spec, stat, b: int, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    if spec.type == "classification":
        logits = torch.full((b, spec.num_classes), -10.0)
        logits[:, int(stat)] = 10.0
        return {"logits": logits}
    if spec.type == "regression":
        return {"value": torch.full((b,), float(stat))}
    if spec.type == "segmentation":
        logits = torch.full((b, spec.num_classes, *hw), -10.0)
        logits[:, int(stat)] = 10.0
        return {"mask_logits": logits}
    if spec.type == "detection":
        n = 16
        logits = torch.full((b, n, spec.num_classes + 1), -10.0)
        logits[..., -1] = 10.0  # every query says "no object"
        return {
            "logits": logits,
            "boxes": torch.full((b, n, 4), 0.5),
            "image_size": torch.tensor([hw] * b, dtype=torch.long),
        }
    raise NotImplementedError(spec.type)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/synthetic")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--img-size", type=int, nargs=2, default=[160, 256])
    args = ap.parse_args()
    dm = IdDataModule(
        root=args.root, img_size=tuple(args.img_size), batch_size=64, augment=False, num_workers=0
    )
    dm.prepare_data()
    dm.setup("fit")
    stats = train_statistics(dm)
    dm.setup("test")
    cat = dm.catalogue
    types = {s.name: create_task_type(s) for s in cat.tasks}
    metrics = {n: t.build_metrics() for n, t in types.items()}
    loader = dm.test_dataloader() if args.split == "test" else dm.val_dataloader()
    for batch in loader:
        b = batch["image"].shape[0]
        hw = tuple(batch["image"].shape[-2:])
        for i, spec in enumerate(cat.tasks):
            out = constant_outputs(spec, stats.get(spec.name), b, hw)
            types[spec.name].update_metrics(
                metrics[spec.name], out, batch["targets"][spec.name], batch["present"][:, i]
            )
    print(f"| task | baseline | {args.split} metrics |")
    print("| --- | --- | --- |")
    for spec in cat.tasks:
        vals = types[spec.name].compute_metrics(metrics[spec.name])
        if spec.type == "classification":
            what = f"majority class ({(spec.classes or ())[int(stats[spec.name])]})"
        elif spec.type == "regression":
            what = f"train mean ({types[spec.name].denormalise(float(stats[spec.name])):.3f})"
        elif spec.type == "segmentation":
            what = f"every pixel {(spec.classes or ())[int(stats[spec.name])]}"
        else:
            what = "no boxes"
        shown = ", ".join(f"{k}={float(v):.3f}" for k, v in vals.items())
        print(f"| {spec.name} | {what} | {shown} |")


if __name__ == "__main__":
    main()
