"""The ``classifier`` task resolver: a trained task classifier decides which tasks apply to an image.

Chosen with ``data.task_resolver: classifier`` and ``data.resolver_args``::

    task_classifier_ckpt: runs/task_classifier/checkpoints/best.ckpt   # idrecog fit --config lightning_configs/task_classifier.yaml
    threshold: 0.5              # or per task: {hologram: 0.4, nationality_match: 0.6} (others 0.5)
    mode: missing_only          # classify only samples without doc_type (default) | all: every sample

The classifier runs batched once per split (the eval transform) and its probabilities are cached on disk under
``cache_dir``, keyed by the checkpoint's content hash, the manifest's content hash, the classified sample ids and
the mode, so a second run reads the cache ("cache hit"). Thresholds are applied after the cache: changing them
needs no new pass. Recognition calls :meth:`TaskResolver.resolve_batch`, which classifies the images without a doc type. See
docs/task-resolution.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from idrecog.data.manifest import Sample
from idrecog.data.resolution.base import (
    TASK_CLASSIFIER,
    DocTypeResolver,
    Resolution,
    TaskResolver,
    register_task_resolver,
)
from idrecog.errors import ConfigError
from idrecog.models.task_classifier import TaskClassifier
from idrecog.tasks.catalogue import TaskCatalogue
from idrecog.utils.checkpoint import file_sha256

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_ARG = "data.resolver_args"

# per process: loaded classifiers by (checkpoint hash, device)
_MODELS: dict[tuple[str, str], tuple[TaskClassifier, TaskCatalogue]] = {}


def _info(msg: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"[data] task resolver classifier: {msg}")


def default_cache_dir() -> Path:
    """``$IDRECOG_CACHE/task_resolver`` (default ``~/.cache/idrecog/task_resolver``)."""
    base = os.environ.get("IDRECOG_CACHE") or Path.home() / ".cache" / "idrecog"
    return Path(base) / "task_resolver"


def manifest_sha256(samples: list[Sample]) -> str:
    """Content hash of the manifest file(s) the samples came from; of the samples themselves when they came from
    no file (built in memory)."""
    sources = sorted({s.source for s in samples})
    h = hashlib.sha256()
    if sources and all(src and Path(src).is_file() for src in sources):
        for src in sources:
            h.update(file_sha256(src).encode())
    else:
        for s in samples:
            h.update(json.dumps(s.to_json(), sort_keys=True).encode())
    return h.hexdigest()


def _check_threshold(threshold: Any, field: str = _ARG) -> None:
    values = threshold.values() if isinstance(threshold, Mapping) else [threshold]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < float(v) < 1.0:
            raise ConfigError(
                f"{field}.threshold: must be a probability in (0, 1) or {{task: probability}}, got {threshold!r}"
            )


@register_task_resolver
class ClassifierResolver(TaskResolver):
    """Tasks from a trained task classifier (:class:`~idrecog.models.task_classifier.TaskClassifier`, trained by
    ``TaskClassifierModule``).

    Args:
        catalogue: the dataset's catalogue; the checkpoint's tasks must be the same (in any order).
        task_classifier_ckpt: the classifier checkpoint (``idrecog fit --config lightning_configs/task_classifier.yaml``).
        threshold: probability at or above which a task applies; a float, or ``{task: float}`` (unlisted tasks 0.5).
        mode: ``missing_only``: the classifier decides only for samples without ``doc_type`` (the others use the
            ``doc_types`` mapping); ``all``: for every sample; ``unannotated``: for samples without an annotated
            task set (the manifest's ``tasks``; the others use it).
        batch_size: images per classifier forward pass.
        cache_dir: where probabilities are cached (default :func:`default_cache_dir`).
        check: in ``missing_only`` mode, also classify up to this many samples whose doc type is known, to log
            the agreement with the mapping (0: none).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        num_workers: DataLoader workers reading the images.
        field: how error messages name these arguments (``data.resolver_args`` in the DataModule,
            ``--task_resolver`` in ``idrecog recognize``/``serve``).
    """

    name = "classifier"
    MODES: ClassVar[tuple[str, ...]] = ("missing_only", "all", "unannotated")

    def __init__(
        self,
        catalogue: TaskCatalogue,
        task_classifier_ckpt: str | Path,
        threshold: float | dict[str, float] = 0.5,
        mode: str = "missing_only",
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        check: int = 64,
        device: str = "auto",
        num_workers: int = 0,
        field: str = _ARG,
    ) -> None:
        super().__init__(catalogue)
        self.field = field
        type(self).check_args(
            field=field,
            task_classifier_ckpt=task_classifier_ckpt,
            threshold=threshold,
            mode=mode,
            batch_size=batch_size,
            check=check,
        )
        self.ckpt_path = Path(task_classifier_ckpt)
        if isinstance(threshold, Mapping):
            unknown = sorted(set(threshold) - set(catalogue.names))
            if unknown:
                raise ConfigError(
                    f"{field}.threshold: unknown task(s) {', '.join(unknown)}; the catalogue has: {', '.join(catalogue.names)}"
                )
        self.threshold = threshold
        self.thresholds = torch.tensor(
            [
                float(threshold.get(t, 0.5)) if isinstance(threshold, Mapping) else float(threshold)
                for t in catalogue.names
            ]
        )
        self.mode = mode
        self.batch_size = int(batch_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.check = int(check)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.ckpt_sha = file_sha256(self.ckpt_path)
        #: what the last ``resolve`` did: split, counts, cache hit, agreement
        self.last_stats: dict[str, Any] = {}
        self._model, trained_on = self._load()
        names = trained_on.names
        # the classifier's outputs in this catalogue's order
        self._order = torch.tensor([names.index(t) for t in catalogue.names])

    # ------------------------------------------------------------------ validation and loading
    @classmethod
    def check_args(cls, field: str = _ARG, **kwargs: Any) -> None:
        """Catalogue-free checks the DataModule runs when it is built, before any data is generated or read
        (``field``: how messages name the arguments)."""
        ckpt = kwargs.get("task_classifier_ckpt")
        if ckpt is None:
            raise ConfigError(f"{field}.task_classifier_ckpt is required for the classifier task resolver")
        if not Path(ckpt).is_file():
            raise ConfigError(
                f"{field}.task_classifier_ckpt: checkpoint not found: {ckpt} (train one with "
                "`idrecog fit --config lightning_configs/task_classifier.yaml`)"
            )
        mode = kwargs.get("mode", "missing_only")
        if mode not in cls.MODES:
            raise ConfigError(f"{field}.mode must be one of {cls.MODES}, got {mode!r}")
        _check_threshold(kwargs.get("threshold", 0.5), field)
        bs = kwargs.get("batch_size", 64)
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ConfigError(f"{field}.batch_size must be an integer >= 1, got {bs!r}")
        check = kwargs.get("check", 64)
        if isinstance(check, bool) or not isinstance(check, int) or check < 0:
            raise ConfigError(f"{field}.check must be an integer >= 0, got {check!r}")

    def _load(self) -> tuple[TaskClassifier, TaskCatalogue]:
        key = (self.ckpt_sha, str(self.device))
        loaded = _MODELS.get(key)
        if loaded is None:
            from idrecog.utils.checkpoint import load_checkpoint

            ckpt = load_checkpoint(self.ckpt_path, map_location="cpu")
            stored = (ckpt.get("hyper_parameters") or {}).get("catalogue")
            if not isinstance(stored, Mapping) or "tasks" not in stored:
                raise ConfigError(
                    f"{self.ckpt_path}: not a task-classifier checkpoint (no catalogue in its hparams)"
                )
            self._check_tasks([str(t.get("name")) for t in stored["tasks"]])
            net, trained_on = TaskClassifier.from_checkpoint(ckpt, where=str(self.ckpt_path))
            loaded = (net.to(self.device), trained_on)
            _MODELS.clear()  # keep one classifier in memory
            _MODELS[key] = loaded
        else:
            self._check_tasks(loaded[1].names)
        mapping = loaded[1].doc_types
        if self.catalogue.doc_types is not None and mapping != self.catalogue.doc_types:
            log.warning(
                "%s: the classifier was trained on another doc_types mapping than %s",
                self.ckpt_path,
                self.catalogue.source,
            )
        return loaded

    def _check_tasks(self, ckpt_tasks: list[str]) -> None:
        ours = self.catalogue.names
        only_ckpt = [t for t in ckpt_tasks if t not in ours]
        only_cat = [t for t in ours if t not in ckpt_tasks]
        if only_ckpt or only_cat:
            parts = []
            if only_ckpt:
                parts.append(f"only in the checkpoint: {', '.join(only_ckpt)}")
            if only_cat:
                parts.append(f"only in {self.catalogue.source}: {', '.join(only_cat)}")
            raise ConfigError(
                f"{self.field}.task_classifier_ckpt: {self.ckpt_path}: its task list differs from the catalogue ("
                + "; ".join(parts)
                + ")"
            )

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict_proba(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] ImageNet-normalised (any size) -> probabilities [N, T] in catalogue order."""
        probs = self._model.predict_proba(images.to(self.device, torch.float32)).cpu()
        return probs[:, self._order]

    def apply_thresholds(self, probs: Tensor) -> list[list[str]]:
        """probs: [N, T] -> the applying task names per row (catalogue order)."""
        hit = probs >= self.thresholds
        names = self.catalogue.names
        return [[names[j] for j in row.nonzero().flatten().tolist()] for row in hit]

    def classify_images(self, images: Tensor) -> list[list[str]]:
        """images: [N, 3, H, W] ImageNet-normalised (as the DataModule and the recognizer make them) -> task names
        per image, in catalogue order."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        return self.apply_thresholds(self.predict_proba(images))

    def resolve_unknown(
        self, images: Tensor | None, outputs: Sequence[Mapping[str, Any]] | None
    ) -> list[Resolution]:
        if images is None:
            raise ConfigError(f"task resolver {self.name!r} needs the images")
        return [Resolution(tasks, TASK_CLASSIFIER) for tasks in self.classify_images(images)]

    def _classify(self, samples: list[Sample]) -> Tensor:
        """probabilities [N, T] (catalogue order) of the samples' images, read with the eval transform."""
        from torch.utils.data import DataLoader

        from idrecog.data.transforms import build_transforms

        ds = _ImageSet(samples, build_transforms("test", self._model.input_size, augment=False))
        loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers)
        return (
            torch.cat([self.predict_proba(x) for x in loader])
            if samples
            else torch.zeros(0, len(self.catalogue))
        )

    def _cached_probs(self, samples: list[Sample], split: str) -> tuple[Tensor, bool]:
        ids = [s.id for s in samples]
        key_src = {
            "version": CACHE_VERSION,
            "checkpoint": self.ckpt_sha,
            "manifest": manifest_sha256(samples),
            "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "mode": self.mode,
            "tasks": self.catalogue.names,
        }
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
        path = self.cache_dir / f"{split}-{key[:24]}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("key") == key and data.get("ids") == ids:
                    return torch.tensor(data["probs"], dtype=torch.float32).reshape(
                        len(ids), len(self.catalogue)
                    ), True
            except (OSError, ValueError, KeyError, RuntimeError):
                log.warning("ignoring an unreadable task-resolver cache file %s", path)
        probs = self._classify(samples)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            record = {
                "key": key,
                **key_src,
                "checkpoint_path": str(self.ckpt_path),
                "ids": ids,
                "probs": probs.tolist(),
            }
            tmp.write_text(json.dumps(record))
            tmp.replace(path)  # atomic: concurrent ranks never read half a file
        except OSError as e:
            log.warning("could not write the task-resolver cache %s: %s", path, e)
        return probs, False

    # ------------------------------------------------------------------ the resolver interface
    def resolve(self, samples: list[Sample], split: str) -> list[list[str]]:
        by_doc_type = DocTypeResolver(self.catalogue).resolve(samples, split)
        if self.mode == "unannotated":
            # the annotation decides where there is one; the classifier's answer for the others is the base
            by_doc_type = [
                self.ordered(s.tasks) if s.tasks is not None else d
                for s, d in zip(samples, by_doc_type, strict=True)
            ]
            known = [s.tasks is not None for s in samples]
        else:
            known = [s.doc_type is not None for s in samples]
        if self.mode == "all":
            todo = list(range(len(samples)))
        else:
            missing = [i for i, k in enumerate(known) if not k]
            with_dt = [i for i, k in enumerate(known) if k]
            # an evenly spread, deterministic sample of the others, for the agreement figure
            step = max(1, len(with_dt) // self.check) if self.check else 0
            extra = with_dt[::step][: self.check] if step else []
            todo = sorted(missing + extra)
        out = list(by_doc_type)
        hit = False
        agree: Counter[str] = Counter()
        n_both = 0
        if todo:
            probs, hit = self._cached_probs([samples[i] for i in todo], split)
            predicted = self.apply_thresholds(probs)
            for i, tasks in zip(todo, predicted, strict=True):
                if known[i]:
                    n_both += 1
                    agree["exact"] += tasks == by_doc_type[i]
                    for t in set(tasks) ^ set(by_doc_type[i]):
                        agree[t] += 1
                if self.mode == "all" or not known[i]:
                    out[i] = tasks
        n_resolved = sum(1 for i in todo if self.mode == "all" or not known[i])
        self.last_stats = {
            "split": split,
            "samples": len(samples),
            "resolved": n_resolved,
            "without_doc_type": known.count(False),
            "classified": len(todo),
            "cache_hit": hit,
            "agreement_samples": n_both,
            "agreement": agree["exact"] / n_both if n_both else None,
            "disagreements": {t: c for t, c in agree.items() if t != "exact"},
        }
        if todo:
            _info(f"{split}: {'cache hit' if hit else 'ran the classifier'} ({len(todo)} images)")
        msg = f"{split}: resolved {n_resolved} of {len(samples)} samples with the classifier"
        lacking, reference = (
            ("without a task set", "the annotations")
            if self.mode == "unannotated"
            else ("without doc_type", "the doc_types mapping")
        )
        msg += f" ({known.count(False)} {lacking}, mode {self.mode})"
        if n_both:
            per_task = ", ".join(f"{t}: {c}" for t, c in sorted(self.last_stats["disagreements"].items()))
            msg += (
                f"; agreement with {reference}: {agree['exact']}/{n_both} = {agree['exact'] / n_both:.1%}"
                + (f" (disagreements per task: {per_task})" if per_task else "")
            )
        _info(msg)
        return out

    def known(self, samples: list[Sample]) -> list[bool]:
        # the classifier's answers are guesses: in mode unannotated only annotated task sets teach the gate
        if self.mode == "unannotated":
            return [s.tasks is not None for s in samples]
        return super().known(samples)

    def describe(self) -> str:
        return f"{self.name} ({self.ckpt_path}; mode {self.mode}; threshold {self.threshold})"


class _ImageSet(torch.utils.data.Dataset):
    """The samples' main images through the eval transform: [3, H, W] float, normalised."""

    def __init__(self, samples: list[Sample], transform: Any) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tensor:
        from idrecog.data.dataset import read_rgb
        from idrecog.errors import DataFormatError

        s = self.samples[index]
        path = Path(s.source).parent / s.image if s.source else Path(s.image)
        try:
            image = read_rgb(path)
        except (OSError, ValueError) as e:
            raise DataFormatError(
                f"cannot read image {path}: {e}", file=s.source, line=s.line, field="image"
            ) from None
        out = self.transform({"image": image, "frames": None, "targets": {}})
        return out["image"].as_subclass(Tensor)
