"""Random batches in the DataModule's batch contract, for benchmarks and tests that measure the model alone."""

from __future__ import annotations

import torch
from torch import Tensor

from idrecog.data.catalogue import TaskCatalogue


class PrecollatedBatches(torch.utils.data.Dataset):
    """A list of ready batches served as a dataset (use with ``batch_size=None``), to time or test the model
    without the data pipeline."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def _identity(x: dict) -> dict:
    return x


def precollated_loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    """A DataLoader that yields ``batches`` as they are (picklable, so worker processes work too)."""
    return torch.utils.data.DataLoader(PrecollatedBatches(batches), batch_size=None, collate_fn=_identity)


def make_random_batch(
    catalogue: TaskCatalogue,
    batch_size: int,
    img_size: tuple[int, int],
    *,
    present_prob: float = 1.0,
    boxes_per_sample: int = 4,
    num_angles: int = 2,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """A batch with random images and labels for every catalogue task.

    images: [B, 3, H, W]; present: [B, T] with probability ``present_prob``; targets in each type's collated format.
    """
    g = generator or torch.Generator().manual_seed(0)
    h, w = img_size
    b, t = batch_size, len(catalogue)
    present = torch.rand(b, t, generator=g) < present_prob
    targets: dict[str, object] = {}
    for i, spec in enumerate(catalogue.tasks):
        col = present[:, i]
        if spec.type == "classification":
            y = torch.randint(0, spec.num_classes, (b,), generator=g)
            targets[spec.name] = torch.where(col, y, torch.full_like(y, -1))
        elif spec.type == "regression":
            y = torch.rand(b, generator=g)
            targets[spec.name] = torch.where(col, y, torch.full_like(y, float("nan")))
        elif spec.type == "segmentation":
            m = torch.randint(0, spec.num_classes, (b, h, w), generator=g)
            m[~col] = 255
            targets[spec.name] = m
        elif spec.type == "detection":
            dets: list[dict[str, Tensor] | None] = []
            for j in range(b):
                if not col[j]:
                    dets.append(None)
                    continue
                xy = torch.rand(boxes_per_sample, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
                wh = (torch.rand(boxes_per_sample, 2, generator=g) * 0.25 + 0.05) * torch.tensor([w, h])
                boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([w, h]))], dim=1)
                labels = torch.randint(0, spec.num_classes, (boxes_per_sample,), generator=g)
                dets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
            targets[spec.name] = dets
        else:  # a plugin type: its own example label, collated
            raise NotImplementedError(f"make_random_batch does not know task type {spec.type!r}")
    batch = {
        "image": torch.randn(b, 3, h, w, generator=g).to(device),
        "applies": torch.ones(b, t, dtype=torch.bool, device=device),
        "present": present.to(device),
        "targets": {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in targets.items()},
        "ids": [f"r{j}" for j in range(b)],
        "doc_type": [None] * b,
    }
    if any(s.uses_frames for s in catalogue.tasks):
        batch["assoc"] = {
            "flash": torch.randn(b, 3, h, w, generator=g).to(device),
            "angles": torch.randn(b, num_angles, 3, h, w, generator=g).to(device),
            "mask": torch.ones(b, 1 + num_angles, dtype=torch.bool, device=device),
        }
    return batch
