"""Random batches in the DataModule's batch contract, for benchmarks and tests that measure the model alone."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from torch import Tensor

from idrecog.tasks.catalogue import TaskCatalogue
from idrecog.tasks.registry import create_task_type


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


def _to(value: object, device: str | torch.device) -> object:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def make_random_batch(
    catalogue: TaskCatalogue,
    batch_size: int,
    img_size: tuple[int, int],
    *,
    present_prob: float = 1.0,
    num_angles: int = 2,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """A batch with random images and example labels for every catalogue task.

    images: [B, 3, H, W]; present: [B, T] with probability ``present_prob``; targets: each task type's
    ``example_target`` (its collated format), so plug-in types work too.
    """
    g = generator or torch.Generator().manual_seed(0)
    h, w = img_size
    b, t = batch_size, len(catalogue)
    present = torch.rand(b, t, generator=g) < present_prob
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    targets: dict[str, object] = {}
    for i, spec in enumerate(catalogue.tasks):
        # each task type makes its own example labels (any registered type, plug-ins included)
        target = create_task_type(spec).example_target(present[:, i].tolist(), (h, w), seed=seed + 97 * i)
        targets[spec.name] = _to(target, device)
    batch = {
        "image": torch.randn(b, 3, h, w, generator=g).to(device),
        "applies": torch.ones(b, t, dtype=torch.bool, device=device),
        "present": present.to(device),
        "targets": targets,
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


def multipart_body(
    files: Sequence[tuple[str, str, bytes]],
    fields: dict[str, str] | None = None,
    boundary: str = "idrecogBoundary7",
) -> tuple[bytes, str]:
    """Encode a multipart/form-data body with the standard library (the load benchmark's client, tests).

    files: (field, filename, bytes) triples. Returns (body, content type).
    """
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, filename, data in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
