"""The recognizer: one unified-model forward pass per batch of images, all their tasks, plus decision rules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from idrecog.data.catalogue import TaskCatalogue
from idrecog.errors import ConfigError
from idrecog.recognition.rules import RuleSet, load_rules


@dataclass
class RecognitionRequest:
    """One document to recognise: the image, optional frames of the same capture, user info and doc type."""

    image: Image.Image
    id: str = "image"
    flash: Image.Image | None = None
    angles: list[Image.Image] = field(default_factory=list)
    user: dict[str, Any] | None = None
    doc_type: str | None = None


# "doc_type predicted": the unified model's own doc_type head chose the doc type (no task classifier configured)
DOC_TYPE_GIVEN, CLASSIFIER, ALL = "doc_type given", "doc_type predicted", "all"
TASK_CLASSIFIER = "task classifier"


def safe_name(text: str) -> str:
    """A file-name-safe version of a sample id."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".")
    return out[:120] or "image"


def resolve_tasks(
    catalogue: TaskCatalogue, doc_type: str | None, outputs: Mapping[str, Any], doc_type_task: str | None
) -> dict[str, Any]:
    """Which tasks apply to one document and how that was decided.

    The given doc type when there is one; else the doc type the model's doc-type classifier predicted (its task
    output is in ``outputs``); else every task.
    """
    if doc_type is not None:
        return {"how": DOC_TYPE_GIVEN, "doc_type": doc_type, "tasks": catalogue.tasks_for(doc_type)}
    if doc_type_task is not None and doc_type_task in outputs:
        predicted = outputs[doc_type_task]["class"]
        tasks = catalogue.tasks_for(predicted)
        return {"how": CLASSIFIER, "doc_type": predicted, "tasks": tasks}
    return {"how": ALL, "doc_type": None, "tasks": catalogue.names}


def write_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(path)


def make_record(
    pred: Mapping[str, Any],
    catalogue: TaskCatalogue,
    *,
    doc_type_task: str | None = None,
    routing: Mapping[str, Any] | None = None,
    rules: RuleSet | None = None,
    out_dir: str | Path | None = None,
    image: str | None = None,
    classifier_tasks: list[str] | None = None,
) -> dict[str, Any]:
    """One ``predict_step`` result -> the recognize JSON object.

    ``pred`` holds every task the forward pass computed (``outputs``; ``withheld`` where the gate held a task
    back); the record keeps the resolved tasks only. Masks become PNG files under ``out_dir/masks`` (their path
    in ``mask``), or are dropped without ``out_dir``; ``mask_size`` is [H, W] either way. ``classifier_tasks``:
    the task classifier's tasks for an image without a given doc type (they win over ``doc_type_task``).
    """
    if classifier_tasks is not None and pred.get("doc_type") is None:
        resolved = {"how": TASK_CLASSIFIER, "doc_type": None, "tasks": classifier_tasks}
    else:
        resolved = resolve_tasks(catalogue, pred.get("doc_type"), pred["outputs"], doc_type_task)
    keep = set(resolved["tasks"])
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
    record["tasks"] = {"resolved": [t for t in catalogue.names if t in keep], "how": resolved["how"]}
    record["doc_type"] = resolved["doc_type"]
    record["outputs"] = outputs
    record["withheld"] = {t: v for t, v in (pred.get("withheld") or {}).items() if t in keep}
    if routing is not None:
        record["routing"] = {t: v for t, v in routing.items() if t in keep}
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
        task_resolver: resolves the tasks of images without a given doc type instead of ``doc_type_task``: an
            object with ``resolve_images(images [N, 3, H, W]) -> list[list[str]]``, e.g.
            ``idrecog.data.classifier_resolver.ClassifierResolver(catalogue, "task_classifier.ckpt")``.
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
        from idrecog.data.user import UserFeatureEncoder

        self.module = module.eval()
        self.catalogue: TaskCatalogue = module.catalogue
        if isinstance(rules, str | Path):
            rules = load_rules(rules, self.catalogue)
        self.rules = rules
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if doc_type_task == "auto":
            doc_type_task = self.catalogue.doc_type_task
        elif doc_type_task is not None and doc_type_task not in self.catalogue:
            raise ConfigError(f"doc_type_task {doc_type_task!r} is not a task of the model")
        self.doc_type_task = doc_type_task
        self.batch_size = max(1, int(batch_size))
        self.task_resolver = task_resolver
        self.img_size = tuple(module.model.encoder.img_size)
        # the DataModule's eval pipeline: same resize, dtype scaling and normalisation, same collation
        self.transform = build_transforms("predict", self.img_size, augment=False)
        self.collate = Collator(self.catalogue)
        state = getattr(module, "user_features", None)
        self.user_encoder = UserFeatureEncoder.from_state(state) if state else None
        self.frame_tasks = any(s.uses_frames for s in self.catalogue)
        self.user_tasks = any(s.uses_user for s in self.catalogue)
        self._captured: dict[str, Any] = {}
        self.module.model.register_forward_hook(self._capture)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path, map_location: str = "cpu", **kwargs: Any) -> Recognizer:
        from idrecog.lit.unified import load_unified

        return cls(load_unified(ckpt_path, map_location=map_location), **kwargs)

    def _capture(self, module: Any, args: Any, output: dict[str, Any]) -> None:
        self._captured = output

    def info(self) -> dict[str, Any]:
        return {
            "img_size": list(self.img_size),
            "doc_type_task": self.doc_type_task,
            "rules": self.rules.source if self.rules is not None else None,
            "task_resolver": (
                str(getattr(self.task_resolver, "ckpt_path", type(self.task_resolver).__name__))
                if self.task_resolver is not None
                else None
            ),
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
        routing = _routing(self._captured, self.module.model.interpreter.type_names, len(requests))
        classifier_tasks: list[list[str] | None] = [None] * len(requests)
        missing = [j for j, r in enumerate(requests) if r.doc_type is None]
        if self.task_resolver is not None and missing:
            for j, tasks in zip(
                missing, self.task_resolver.resolve_images(batch["image"][missing]), strict=True
            ):
                classifier_tasks[j] = tasks
        return [
            make_record(
                p,
                self.catalogue,
                doc_type_task=self.doc_type_task,
                routing=routing[j],
                rules=self.rules,
                out_dir=self.out_dir,
                image=None if images is None else images[j],
                classifier_tasks=classifier_tasks[j],
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


def _routing(out: Mapping[str, Any], type_names: list[str], b: int) -> list[dict[str, Any]]:
    """The gate's decision per sample and task: routed or not, the type it picked and its probability."""
    res: list[dict[str, Any]] = [{} for _ in range(b)]
    gate = out.get("gate_logits") or {}
    routed = out.get("routed") or {}
    for task, logits in gate.items():
        probs = logits.detach().float().softmax(-1).cpu()
        r = routed.get(task)
        for j in range(b):
            k = int(probs[j].argmax())
            res[j][task] = {
                "routed": bool(r[j]) if r is not None else True,
                "gate": type_names[k] if k < len(type_names) else str(k),
                "gate_probability": round(float(probs[j, k]), 6),
            }
    return res
