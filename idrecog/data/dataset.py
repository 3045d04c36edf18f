"""``IdDataset``: one split of a dataset folder (``DIR/tasks.yaml`` + ``DIR/{split}.jsonl``) as a torch Dataset.

An item (before collation, see :func:`idrecog.data.collate.collate_samples`)::

    image:     tv_tensors.Image float [3, H, W] (normalised when the transform normalises)
    targets:   {task: load_target(...) after the transform, or None when the task does not apply / no label}
    applies:   bool [T]   the task applies to the sample (task resolver)
    applies_known: bool   the sample's task set is known, not assumed (the gate learns applicability from these)
    gate_decides: bool    training: the model's gate decides which of ``applies`` train (resolver ``gate``)
    present:   bool [T]   applies AND the label is non-null and loaded
    frames_missing: bool [T]  a multi-frame task whose frames are missing (its label is masked)
    id, doc_type
    assoc:     {"flash": Image | None, "angles": [Image | None, ...]}  only when an applying task uses frames
    user:      UserFeatureEncoder.encode(sample.user)                    only when an applying task uses user info

The transform is called once per item on ``{"image", "frames", "targets"}`` so geometric augmentation moves
the image, the frames of the same capture, the masks and the boxes together.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from idrecog.data.collate import SKIPPED
from idrecog.data.manifest import Sample, read_manifest
from idrecog.data.resolution import DocTypeResolver, TaskResolver
from idrecog.errors import ConfigError, DataFormatError
from idrecog.models.user import UserFeatureEncoder
from idrecog.tasks.catalogue import TaskCatalogue, TaskSpec, load_catalogue
from idrecog.tasks.registry import create_task_type

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip", "mask")
#: PIL's own default limit (about 89.5 megapixels), used when none is configured
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLargeError(ValueError):
    """An image has more pixels than the configured limit (decompression-bomb guard)."""


def check_image_pixels(path: Path | BinaryIO, max_pixels: int) -> None:
    """Raise ``ImageTooLargeError`` when the image header declares more than ``max_pixels`` pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(f"{e} (decompression-bomb guard)") from None
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"image is {w}x{h} = {w * h} pixels, more than data.max_image_pixels={max_pixels} "
            "(decompression-bomb guard)"
        )


def read_rgb(path: Path | BinaryIO, max_pixels: int | None = None) -> tv_tensors.Image:
    """Decode an image file to ``tv_tensors.Image`` uint8 [3, H, W] (PIL decode; alpha and palettes dropped).

    ``max_pixels``: refuse (``ImageTooLargeError``) an image whose header declares more pixels, before decoding
    it: a small compressed file can expand to gigabytes (a decompression bomb).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"image is {w}x{h} = {w * h} pixels, more than data.max_image_pixels={max_pixels} "
                        "(decompression-bomb guard)"
                    )
                arr = np.asarray(im.convert("RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(
                f"{e} (decompression-bomb guard; raise data.max_image_pixels to allow it)"
            ) from None
    return tv_tensors.Image(torch.from_numpy(arr.copy()).permute(2, 0, 1))


class FolderFiles:
    """Where ``IdDataset`` reads a sample's files: the dataset folder (the default)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, rel: str) -> Path | BinaryIO:
        """What ``PIL.Image.open`` reads for ``rel`` (a fresh object per call)."""
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def describe(self, rel: str) -> str:
        return str(self.root / rel)

    @contextmanager
    def label_root(self) -> Iterator[Path]:
        """The folder ``TaskType.load_target`` reads label files (masks) from."""
        yield self.root


def frames_available(spec_uses: tuple[str, ...], flash: Any, angles: list[Any]) -> bool:
    """A multi-frame task can be answered when every frame kind it uses has at least one frame."""
    if "flash" in spec_uses and flash is None:
        return False
    return not ("angles" in spec_uses and not any(a is not None for a in angles))


def user_available(spec: TaskSpec, user: Mapping[str, Any] | None) -> bool:
    """A task that uses user information can be answered when the sample has some, with every part the task
    requires on its own (``requires: [user.attributes]``: the declared details, not the behaviour alone)."""
    if not user:
        return False
    return all(user.get(p) for p in spec.required_user_parts)


class IdDataset(Dataset):
    """One split of a dataset folder.

    Args:
        root: the dataset folder.
        split: ``train``, ``val``, ``test`` (reads ``root/{split}.jsonl``), ignored when ``samples`` is given.
        catalogue: defaults to ``root/tasks.yaml``.
        resolver: which tasks apply to each sample; defaults to ``DocTypeResolver(catalogue)``.
        transform: a v2 transform called on ``{"image", "frames", "targets"}``; by default only a float
            conversion (no resize, no normalisation).
        user_encoder: encodes ``sample.user``; fitted on this split's samples when None and a task uses user info.
        on_error: ``raise`` (a label, mask or frame that fails to load raises ``DataFormatError``), ``skip``
            (a sample with an unreadable image, frame or label is replaced by ``{SKIPPED: reason, "id": ...}``,
            which ``idrecog.data.collate.SkippingCollator`` drops and counts) or ``mask`` (that label
            is masked and counted in ``counts``; an unreadable main image still raises).
        max_image_pixels: images (and frames) with more pixels are refused before decoding; None: no limit
            beyond PIL's global ``Image.MAX_IMAGE_PIXELS``.
        cache_images: keep decoded images and frames in memory (for small datasets; per worker process).
        load_frames: decode and transform the associated frames of multi-frame tasks. False when the model reads
            no frames (learned or text queries): items carry no ``assoc`` and a multi-frame label is masked only
            when the manifest lists none of its frames (the files are not opened).
        drop_empty: drop samples to which no task applies (e.g. ``DocTypeResolver(missing="skip")``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        catalogue: TaskCatalogue | None = None,
        *,
        resolver: TaskResolver | None = None,
        transform: Callable[[Any], Any] | None = None,
        user_encoder: UserFeatureEncoder | None = None,
        on_error: str = "raise",
        allow_external_paths: bool = False,
        cache_images: bool = False,
        load_frames: bool = True,
        samples: list[Sample] | None = None,
        drop_empty: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root = Path(root)
        self.split = split
        self.catalogue = catalogue if catalogue is not None else load_catalogue(self.root / "tasks.yaml")
        if samples is None:
            samples = read_manifest(
                self.root / f"{split}.jsonl", self.catalogue, allow_external_paths=allow_external_paths
            )
        self.resolver = resolver if resolver is not None else DocTypeResolver(self.catalogue)
        resolved = self.resolver.resolve(samples, split)
        if len(resolved) != len(samples):
            raise ConfigError(
                f"task resolver {self.resolver.name!r} returned {len(resolved)} results for {len(samples)} samples"
            )
        names = self.catalogue.names
        applies = torch.zeros(len(samples), len(names), dtype=torch.bool)
        for i, tasks in enumerate(resolved):
            for t in tasks:
                if t not in self.catalogue:
                    raise ConfigError(f"task resolver {self.resolver.name!r} returned unknown task {t!r}")
                applies[i, self.catalogue.index(t)] = True
        known = torch.tensor(self.resolver.known(samples), dtype=torch.bool)
        keep = applies.any(1) if drop_empty else torch.ones(len(samples), dtype=torch.bool)
        self.n_dropped = int((~keep).sum())
        self.samples: list[Sample] = [s for s, k in zip(samples, keep.tolist(), strict=True) if k]
        self.applies = applies[keep]
        self.applies_known = known[keep]
        # samples whose tasks the model's gate decides during training (a resolver that defers to it)
        self.gate_decides = (
            ~self.applies_known
            if self.resolver.model_decides_unknown
            else torch.zeros_like(self.applies_known)
        )
        self.task_types = [create_task_type(spec) for spec in self.catalogue]
        self.frame_tasks = [j for j, spec in enumerate(self.catalogue) if spec.uses_frames]
        self.user_tasks = [j for j, spec in enumerate(self.catalogue) if spec.uses_user]
        if user_encoder is None and self.user_tasks:
            user_encoder = UserFeatureEncoder.fit(s.user for s in self.samples)
        self.user_encoder = user_encoder
        self.transform = (
            transform
            if transform is not None
            else v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
        )
        self.on_error = on_error
        self.max_image_pixels = max_image_pixels
        self.cache_images = cache_images
        self.load_frames = load_frames
        self._cache: dict[str, tv_tensors.Image] = {}
        self.files = FolderFiles(self.root)
        #: per-process counts of masked labels: "frames_missing/<task>", "user_missing/<task>", "load_error/<task>"
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------ summaries
    def manifest_missing_frames(self) -> dict[str, int]:
        """Per multi-frame task: labelled samples it applies to whose manifest lists none of the frames it uses."""
        out: dict[str, int] = {}
        for j in self.frame_tasks:
            spec = self.catalogue.tasks[j]
            n = 0
            for s, a in zip(self.samples, self.applies[:, j].tolist(), strict=True):
                if (
                    a
                    and s.labels.get(spec.name) is not None
                    and not frames_available(spec.uses, s.flash, s.angles)
                ):
                    n += 1
            out[spec.name] = n
        return out

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Per task whose label is one of its classes (classification): ``{class: samples}`` over the labels the
        model trains on, i.e. where the task applies (the resolver), the label is not null, and the frames or
        user information the task needs are listed in the manifest (as ``__getitem__`` masks them). Read from the
        manifest: no image is opened."""
        out: dict[str, dict[str, int]] = {}
        for j, (spec, tt) in enumerate(zip(self.catalogue.tasks, self.task_types, strict=True)):
            if not tt.predicts_class:
                continue
            counts = dict.fromkeys(spec.classes or (), 0)
            for s, a in zip(self.samples, self.applies[:, j].tolist(), strict=True):
                value = s.labels.get(spec.name)
                if not a or not isinstance(value, str) or value not in counts:
                    continue
                if spec.uses_frames and not frames_available(spec.uses, s.flash, s.angles):
                    continue
                if spec.uses_user and not user_available(spec, s.user):
                    continue
                counts[value] += 1
            out[spec.name] = counts
        return out

    # ------------------------------------------------------------------ loading
    def _path(self, rel: str) -> Path:
        return self.root / rel

    def _load_image(self, rel: str, sample: Sample, field: str, files: FolderFiles) -> tv_tensors.Image:
        cached = self._cache.get(rel)
        if cached is not None:
            return cached
        where = files.describe(rel)
        try:
            if self.max_image_pixels is not None:
                check_image_pixels(files.open(rel), self.max_image_pixels)  # from the header, before decoding
            img = read_rgb(files.open(rel))
        except FileNotFoundError:
            raise DataFormatError(
                f"file not found: {where}", file=sample.source, line=sample.line, field=field
            ) from None
        except ImageTooLargeError as e:
            raise DataFormatError(
                f"{where}: {e}", file=sample.source, line=sample.line, field=field
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataFormatError(
                f"cannot decode image {where}: {e}", file=sample.source, line=sample.line, field=field
            ) from None
        if self.cache_images:
            self._cache[rel] = img
        return img

    def _load_frame(
        self, rel: str | None, sample: Sample, field: str, size: tuple[int, int], files: FolderFiles
    ) -> tv_tensors.Image | None:
        if rel is None:
            return None
        try:
            img = self._load_image(rel, sample, field, files)
        except DataFormatError:
            if self.on_error == "skip":
                raise  # the sample is dropped (a missing frame file is a data error under skip)
            if not files.exists(rel) or self.on_error == "mask":
                return None  # a missing frame file counts as a missing frame
            raise
        if tuple(img.shape[-2:]) != size:
            # one capture's frames should share the image size; resize so the joint transform can run
            img = tv_tensors.wrap(F.resize(img, list(size), antialias=True), like=img)
        return img

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, self.files)

    def item(self, index: int, files: FolderFiles) -> dict[str, Any]:
        """Sample ``index`` (of ``self.samples``) with its files read from ``files``: the dataset folder, or
        the bytes a packed record carries (:mod:`idrecog.data.stream`), through the same code either way."""
        if self.on_error != "skip":
            return self._getitem(index, files)
        try:
            return self._getitem(index, files)
        except DataFormatError as e:
            from idrecog.data.preflight import classify_problem

            reason = classify_problem(e)
            self.counts[f"skipped/{reason}"] += 1
            log.warning("skipping sample: %s", e)
            return {SKIPPED: reason, "id": self.samples[index].id, "error": str(e)}

    def _load_targets(
        self,
        s: Sample,
        applies: Tensor,
        present: Tensor,
        frames_missing: Tensor,
        frames: dict[str, Any] | None,
        size: tuple[int, int],
        targets: dict[str, Any],
        label_root: Path,
    ) -> None:
        for j, (spec, tt) in enumerate(zip(self.catalogue.tasks, self.task_types, strict=True)):
            targets[spec.name] = None
            value = s.labels.get(spec.name)
            if not applies[j] or value is None:
                continue
            if spec.uses_frames and not (
                frames_available(spec.uses, frames["flash"], frames["angles"])
                if frames is not None
                # not decoded (load_frames off: the model reads no frames): the manifest decides, so every
                # query design trains on the same labelled set
                else frames_available(spec.uses, s.flash, s.angles)
            ):
                frames_missing[j] = True
                self.counts[f"frames_missing/{spec.name}"] += 1
                continue
            if spec.uses_user and not user_available(spec, s.user):
                self.counts[f"user_missing/{spec.name}"] += 1
                continue
            try:
                targets[spec.name] = tt.load_target(value, label_root, size)
            except (ValueError, OSError) as e:
                if self.on_error in ("raise", "skip"):
                    raise DataFormatError(
                        str(e), file=s.source, line=s.line, field=f"labels.{spec.name}"
                    ) from None
                self.counts[f"load_error/{spec.name}"] += 1
                continue
            present[j] = True

    def _getitem(self, index: int, files: FolderFiles) -> dict[str, Any]:
        s = self.samples[index]
        image = self._load_image(s.image, s, "image", files)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        applies = self.applies[index].clone()
        present = torch.zeros_like(applies)
        frames_missing = torch.zeros_like(applies)

        frames: dict[str, Any] | None = None
        if self.load_frames and any(applies[j] for j in self.frame_tasks):
            frames = {
                "flash": self._load_frame(s.flash, s, "assoc.flash", size, files),
                "angles": [
                    self._load_frame(a, s, f"assoc.angles[{k}]", size, files) for k, a in enumerate(s.angles)
                ],
            }

        targets: dict[str, Any] = {}
        with files.label_root() as label_root:
            self._load_targets(s, applies, present, frames_missing, frames, size, targets, label_root)

        out = self.transform({"image": image, "frames": frames, "targets": targets})
        item: dict[str, Any] = {
            "image": out["image"],
            "targets": out["targets"],
            "applies": applies,
            "applies_known": self.applies_known[index].clone(),
            "gate_decides": self.gate_decides[index].clone(),
            "present": present,
            "frames_missing": frames_missing,
            "id": s.id,
            "doc_type": s.doc_type,
        }
        if frames is not None:
            item["assoc"] = out["frames"]
        if self.user_encoder is not None and any(applies[j] for j in self.user_tasks):
            item["user"] = self.user_encoder.encode(s.user)
        return item

    def __repr__(self) -> str:
        return f"IdDataset(root={str(self.root)!r}, split={self.split!r}, samples={len(self)}, tasks={len(self.catalogue)})"
