"""The recognizer: one unified-model forward pass per batch of images, all their tasks, plus decision rules."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from idrecog.data.resolution import DocTypeHeadResolver, Resolution, TaskResolver
from idrecog.errors import ConfigError
from idrecog.recognition.rules import RuleSet, load_rules
from idrecog.tasks.catalogue import TaskCatalogue
from idrecog.utils.checkpoint import file_sha256


@dataclass
class RecognitionRequest:
    """One document to recognise: the image, optional frames of the same capture, user info and doc type."""

    image: Image.Image
    id: str = "image"
    flash: Image.Image | None = None
    angles: list[Image.Image] = field(default_factory=list)
    user: dict[str, Any] | None = None
    doc_type: str | None = None


def safe_name(text: str) -> str:
    """A file-name-safe version of a sample id."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".")
    return out[:120] or "image"


def write_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(path)


def make_record(
    pred: Mapping[str, Any],
    catalogue: TaskCatalogue,
    resolution: Resolution,
    *,
    rules: RuleSet | None = None,
    out_dir: str | Path | None = None,
    image: str | None = None,
) -> dict[str, Any]:
    """One ``predict_step`` result and its task :class:`Resolution` -> the recognize JSON object.

    ``pred`` holds every task the forward pass computed (``outputs``; ``withheld`` where the gate held a task
    back; ``routing``); the record keeps the resolved tasks only. Masks become PNG files under ``out_dir/masks``
    (their path in ``mask``), or are dropped without ``out_dir``; ``mask_size`` is [H, W] either way.
    """
    keep = set(resolution.tasks)
    outputs: dict[str, Any] = {}
    for task, out in pred["outputs"].items():
        if task not in keep:
            continue
        out = dict(out)
        if isinstance(out.get("mask"), np.ndarray):
            mask = out.pop("mask")
            out["mask_size"] = [int(mask.shape[0]), int(mask.shape[1])]
            if out_dir is not None:
                path = Path(out_dir) / "masks" / f"{safe_name(str(pred['id']))}.{task}.png"
                write_mask(mask, path)
                out["mask"] = str(path)
        outputs[task] = out
    record: dict[str, Any] = {"id": pred["id"]}
    if image is not None:
        record["image"] = image
    record["tasks"] = {"resolved": [t for t in catalogue.names if t in keep], "how": resolution.how}
    record["doc_type"] = resolution.doc_type
    record["outputs"] = outputs
    record["withheld"] = {t: v for t, v in (pred.get("withheld") or {}).items() if t in keep}
    if pred.get("routing") is not None:
        record["routing"] = {t: v for t, v in pred["routing"].items() if t in keep}
    record["recognition"] = rules.evaluate(outputs) if rules is not None else None
    return record


class Recognizer:
    """Recognise documents with a unified model: one forward pass per batch, every task, then decision rules.

    Args:
        module: a ``UnifiedModule`` (see :meth:`from_checkpoint`).
        rules: decision rules (a :class:`RuleSet`, a rule-file path, or None for no recognition result).
        out_dir: where segmentation masks are written as PNG (None: masks are not written).
        doc_type_task: the task whose prediction resolves the tasks of an image without a given doc type;
            ``"auto"``: the classification task whose classes are the catalogue's doc types; None: all tasks.
        batch_size: images per forward pass in :meth:`recognize`.
        task_resolver: a :class:`~idrecog.data.resolution.TaskResolver` for the model's catalogue that decides
            the tasks of each image (``resolve_batch``), e.g. ``ClassifierResolver(catalogue,
            "task_classifier.ckpt")``; None: ``DocTypeHeadResolver(catalogue, doc_type_task)``.
    """

    def __init__(
        self,
        module: Any,
        rules: RuleSet | str | Path | None = None,
        out_dir: str | Path | None = None,
        doc_type_task: str | None = "auto",
        batch_size: int = 8,
        task_resolver: Any | None = None,
    ) -> None:
        from idrecog.data.collate import Collator
        from idrecog.data.transforms import build_transforms
        from idrecog.models.user import UserFeatureEncoder

        self.module = module.eval()
        self.catalogue: TaskCatalogue = module.catalogue
        if isinstance(rules, str | Path):
            rules = load_rules(rules, self.catalogue)
        self.rules = rules
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.batch_size = max(1, int(batch_size))
        self.task_resolver: TaskResolver = task_resolver or DocTypeHeadResolver(self.catalogue, doc_type_task)
        self.img_size = tuple(module.model.encoder.img_size)
        # the DataModule's eval pipeline: same resize, dtype scaling and normalisation, same collation
        self.transform = build_transforms("predict", self.img_size, augment=False)
        self.collate = Collator(self.catalogue)
        state = getattr(module, "user_features", None)
        self.user_encoder = UserFeatureEncoder.from_state(state) if state else None
        self.frame_tasks = any(s.uses_frames for s in self.catalogue)
        self.user_tasks = any(s.uses_user for s in self.catalogue)
        #: ``sha256:HEX`` of the checkpoint file (set by :meth:`from_checkpoint`); else the weights are hashed
        self.checkpoint_sha256: str | None = None
        self._provenance: dict[str, str] | None = None

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path, map_location: str = "cpu", **kwargs: Any) -> Recognizer:
        from idrecog.lit.unified import load_unified

        rec = cls(load_unified(ckpt_path, map_location=map_location), **kwargs)
        rec.checkpoint_sha256 = "sha256:" + file_sha256(ckpt_path)
        return rec

    def provenance(self) -> dict[str, str]:
        """What made a decision, as content hashes: ``model`` (the checkpoint file's SHA-256, or
        ``weights-sha256:`` of the state dict for a model built in memory), ``catalogue`` and ``rules`` (SHA-256
        of their canonical JSON, so comments and layout of the files do not change them)."""
        if self._provenance is None:
            model = self.checkpoint_sha256 or "weights-sha256:" + state_dict_sha256(self.module.state_dict())
            rules = (
                "none"
                if self.rules is None
                else "sha256:" + _json_sha256([{**asdict(r), "line": 0} for r in self.rules.rules])
            )
            self._provenance = {
                "model": model,
                "catalogue": "sha256:" + _json_sha256(self.catalogue.to_dict()),
                "rules": rules,
            }
        return dict(self._provenance)

    def info(self) -> dict[str, Any]:
        return {
            "img_size": list(self.img_size),
            "doc_type_task": getattr(self.task_resolver, "doc_type_task", None),
            "rules": self.rules.source if self.rules is not None else None,
            "task_resolver": self.task_resolver.describe(),
            "provenance": self.provenance(),
        }

    # ------------------------------------------------------------------ inputs
    def _item(self, req: RecognitionRequest) -> dict[str, Any]:
        image = _to_tv_image(req.image)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        frames = None
        if self.frame_tasks:
            frames = {
                "flash": _to_tv_image(req.flash, size) if req.flash is not None else None,
                "angles": [_to_tv_image(a, size) for a in req.angles],
            }
        out = self.transform({"image": image, "frames": frames, "targets": {}})
        t = len(self.catalogue)
        item: dict[str, Any] = {
            "image": out["image"],
            "targets": {},
            "applies": torch.ones(t, dtype=torch.bool),
            "present": torch.zeros(t, dtype=torch.bool),
            "id": req.id,
            "doc_type": req.doc_type,
        }
        if frames is not None:
            item["assoc"] = out["frames"]
        if self.user_encoder is not None and self.user_tasks:
            item["user"] = self.user_encoder.encode(req.user)
        return item

    def make_batch(self, requests: Sequence[RecognitionRequest]) -> dict[str, Any]:
        """Requests -> a batch in the DataModule's contract (every task applies; resolution happens after)."""
        for r in requests:
            if (
                r.doc_type is not None
                and self.catalogue.doc_types is not None
                and r.doc_type not in self.catalogue.doc_types
            ):
                raise ConfigError(
                    f"{r.id}: unknown doc type {r.doc_type!r}; the model knows: {', '.join(self.catalogue.doc_types)}"
                )
        return self.collate([self._item(r) for r in requests])

    # ------------------------------------------------------------------ recognition
    @torch.inference_mode()
    def recognize_batch(
        self, requests: Sequence[RecognitionRequest], images: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """One forward pass for all ``requests`` (all tasks) -> one recognize JSON object per request."""
        if not requests:
            return []
        batch = self.make_batch(requests)
        device = self.module.device
        batch = _to_device(batch, device)
        preds = self.module.predict_step(batch, 0)
        resolutions = self.task_resolver.resolve_batch(
            [r.doc_type for r in requests], batch["image"], [p["outputs"] for p in preds]
        )
        return [
            make_record(
                p,
                self.catalogue,
                resolutions[j],
                rules=self.rules,
                out_dir=self.out_dir,
                image=None if images is None else images[j],
            )
            for j, p in enumerate(preds)
        ]

    def recognize(
        self, requests: Sequence[RecognitionRequest], images: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Recognise any number of requests in batches of ``batch_size``."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i : i + self.batch_size]
            names = None if images is None else images[i : i + self.batch_size]
            out += self.recognize_batch(chunk, names)
        return out


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor, in key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _json_sha256(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _to_tv_image(image: Image.Image, size: tuple[int, int] | None = None) -> Any:
    """PIL -> ``tv_tensors.Image`` uint8 [3, H, W] as the dataset reads files; frames resized to the image size."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    arr = np.asarray(image.convert("RGB"))
    img = tv_tensors.Image(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    if size is not None and tuple(img.shape[-2:]) != tuple(size):
        img = tv_tensors.wrap(F.resize(img, list(size), antialias=True), like=img)
    return img


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: (move(v) if k != "targets" else v) for k, v in batch.items()}
