"""Unlabelled images for MAE pretraining: a folder of images, the images of a dataset manifest, or synthetic
documents rendered on the fly.

Batches are ``{"image": float [B, 3, H, W]}`` normalised with ImageNet mean/std (the unified model's batch contract
uses the same key and normalisation), plus ``"ids": list[str]``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from idrecog.data.manifest import check_relative_path
from idrecog.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from idrecog.errors import ConfigError, DataFormatError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
Source = Literal["synthetic", "folder", "manifest"]


def list_images(root: str | Path) -> list[Path]:
    """Every jpg/jpeg/png/webp under ``root`` (recursive, sorted; hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"image folder not found: {root}")
    found = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(s.startswith(".") for s in p.parts)
    ]
    return sorted(found)


def read_manifest_images(path: str | Path, include_frames: bool = False) -> list[Path]:
    """Image paths of a manifest ``.jsonl`` (labels are ignored, so any catalogue's manifest will do);
    with ``include_frames`` also the associated flash and angle frames."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError("manifest not found", file=path)
    root = path.parent
    out: list[Path] = []
    with path.open(encoding="utf-8") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"not valid JSON: {e.msg}", file=path, line=i, field="<line>") from None
            if not isinstance(obj, dict):
                raise DataFormatError("must be a JSON object", file=path, line=i, field="<line>")
            rels: list[tuple[str, Any]] = [("image", obj.get("image"))]
            assoc = obj.get("assoc") or {}
            if include_frames and isinstance(assoc, dict):
                if assoc.get("flash"):
                    rels.append(("assoc.flash", assoc["flash"]))
                rels += [(f"assoc.angles[{j}]", a) for j, a in enumerate(assoc.get("angles") or []) if a]
            for fld, rel in rels:
                try:
                    out.append(root / check_relative_path(rel))
                except ValueError as e:
                    raise DataFormatError(str(e), file=path, line=i, field=fld) from None
    return out


def build_pretrain_transform(
    img_size: tuple[int, int],
    train: bool = True,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (1.3, 1.9),
    color_jitter: float = 0.2,
) -> v2.Compose:
    """PIL image -> float [3, H, W], ImageNet-normalised. Train: RandomResizedCrop with a document-like aspect
    (``ratio`` is width / height) and light colour jitter; eval: resize to ``img_size``."""
    size = [int(img_size[0]), int(img_size[1])]
    ops: list[Any] = [v2.ToImage()]
    if train:
        ops.append(v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True))
        if color_jitter > 0:
            ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 4))
    else:
        ops.append(v2.Resize(size, antialias=True))
    ops += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
    ]
    return v2.Compose(ops)


class ImageFilesDataset(Dataset):
    """Image files -> ``{"image": [3, H, W], "id": str}``."""

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], Tensor]) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataFormatError(f"cannot read image: {e}", file=path) from None
        return {"image": self.transform(img), "id": str(path)}


class SyntheticDocumentsDataset(Dataset):
    """Fictitious documents rendered on the fly by ``idrecog.synth.generate.render_sample``; the document for
    ``index`` depends only on (seed, split, index), so every epoch sees the same documents under new crops.

    With ``cache`` each rendered document is kept (uint8, about 120 kB at 160 x 256) and only rendered once per
    process: rendering costs about as much as an MAE step on a CPU. Use persistent workers so caches survive epochs.
    """

    def __init__(
        self,
        num_samples: int,
        transform: Callable[[Image.Image], Tensor],
        seed: int = 0,
        split: str = "train",
        render_size: tuple[int, int] = (160, 256),
        cache: bool = True,
    ) -> None:
        try:
            from idrecog.synth.generate import render_sample
        except ImportError as e:
            raise ConfigError(
                f"the synthetic document generator is not available ({e}); use source: folder"
            ) from None
        self.render_sample = render_sample
        self.num_samples = int(num_samples)
        self.transform = transform
        self.seed, self.split = int(seed), split
        self.render_size = (int(render_size[0]), int(render_size[1]))
        self.cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.cache.get(int(index)) if self.cache is not None else None
        if img is None:
            h, w = self.render_size
            img = self.render_sample(self.seed, self.split, int(index), height=h, width=w)["image"]
            img = (img if isinstance(img, Image.Image) else Image.fromarray(img)).convert("RGB")
            if self.cache is not None:
                self.cache[int(index)] = img
        return {"image": self.transform(img), "id": f"synthetic-{self.split}-{index}"}


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """-> {"image": [B, 3, H, W], "ids": list[str]}."""
    return {"image": torch.stack([it["image"] for it in items]), "ids": [it["id"] for it in items]}


class PretrainDataModule(LightningDataModule):
    """Images for MAE pretraining.

    Args:
        source: ``synthetic`` (documents rendered on the fly; no files), ``folder`` (every jpg/jpeg/png/webp under
            ``path``, recursively) or ``manifest`` (a dataset folder, whose train.jsonl / val.jsonl are used, or
            one ``.jsonl``; labels are ignored).
        path: the folder or manifest (not used by ``synthetic``).
        img_size: (H, W) of the crops fed to the encoder.
        batch_size / num_workers / pin_memory / persistent_workers: DataLoader settings.
        num_samples: synthetic documents per training epoch.
        val_samples: validation images (synthetic: rendered from the "val" split; folder / single manifest: held
            out from the files, at most a tenth of them).
        seed: synthetic seed and held-out split seed.
        scale / ratio: RandomResizedCrop area fraction and aspect (width / height) ranges.
        include_frames: manifest source: also use the associated flash / angle frames.
        color_jitter: brightness / contrast / saturation jitter strength (hue: a quarter of it).
        cache_synthetic: keep rendered synthetic documents in memory (per worker; see SyntheticDocumentsDataset).
    """

    def __init__(
        self,
        source: Source = "synthetic",
        path: str | None = None,
        img_size: tuple[int, int] = (160, 256),
        batch_size: int = 64,
        num_workers: int = 0,
        num_samples: int = 2000,
        val_samples: int = 64,
        seed: int = 0,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (1.3, 1.9),
        include_frames: bool = False,
        color_jitter: float = 0.2,
        cache_synthetic: bool = True,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        if source not in ("synthetic", "folder", "manifest"):
            raise ConfigError(f"data.source must be synthetic, folder or manifest, got {source!r}")
        if source != "synthetic" and not path:
            raise ConfigError(f"data.source {source!r} needs data.path")
        self.save_hyperparameters()
        self.source, self.path = source, path
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.num_samples, self.val_samples, self.seed = int(num_samples), int(val_samples), int(seed)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.include_frames, self.color_jitter = include_frames, float(color_jitter)
        self.cache_synthetic = cache_synthetic
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def _transforms(self) -> tuple[v2.Compose, v2.Compose]:
        train = build_pretrain_transform(self.img_size, True, self.scale, self.ratio, self.color_jitter)  # type: ignore[arg-type]
        return train, build_pretrain_transform(self.img_size, train=False)

    def _split_files(self, files: list[Path], what: str) -> tuple[list[Path], list[Path]]:
        if not files:
            raise ConfigError(f"no images found in {what} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if len(files) < 2:
            return files, files
        order = list(range(len(files)))
        random.Random(self.seed).shuffle(order)
        n_val = max(1, min(self.val_samples, len(files) // 10))
        val = [files[i] for i in sorted(order[:n_val])]
        train = [files[i] for i in sorted(order[n_val:])]
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train_tf, val_tf = self._transforms()
        if self.source == "synthetic":
            args = (self.seed, "train", self.img_size, self.cache_synthetic)
            self.train_dataset = SyntheticDocumentsDataset(self.num_samples, train_tf, *args)
            self.val_dataset = SyntheticDocumentsDataset(
                self.val_samples, val_tf, self.seed, "val", self.img_size, True
            )
            return
        assert self.path is not None
        path = Path(self.path)
        if self.source == "folder":
            train_files, val_files = self._split_files(list_images(path), str(path))
        elif path.is_dir():
            if not (path / "train.jsonl").is_file():
                raise DataFormatError("dataset folder has no train.jsonl", file=path)
            train_files = read_manifest_images(path / "train.jsonl", self.include_frames)
            if (path / "val.jsonl").is_file():
                val_files = read_manifest_images(path / "val.jsonl", self.include_frames)[: self.val_samples]
            else:
                train_files, val_files = self._split_files(train_files, str(path / "train.jsonl"))
        else:
            train_files, val_files = self._split_files(
                read_manifest_images(path, self.include_frames), str(path)
            )
        self.train_dataset = ImageFilesDataset(train_files, train_tf)
        self.val_dataset = ImageFilesDataset(val_files, val_tf)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup()
            dataset = self.train_dataset if shuffle else self.val_dataset
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= self.batch_size,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=collate_images,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def fixed_images(self, n: int = 4) -> Tensor:
        """The first ``n`` validation images (eval transform, so the same every call): [n, 3, H, W]."""
        self.setup()
        assert self.val_dataset is not None
        n = min(n, len(self.val_dataset))  # type: ignore[arg-type]
        return torch.stack([self.val_dataset[i]["image"] for i in range(n)])
