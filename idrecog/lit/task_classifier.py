"""``TaskClassifierModule``: which catalogue tasks apply to an image (multi-label), for images without a doc type.

Targets come from the catalogue's ``doc_types`` mapping on samples whose ``doc_type`` is known; samples without
one are left out of the loss and the metrics. The backbone is any timm model (``backbone``, pooled features) or the
shared :class:`~idrecog.models.encoder.ViTEncoder` (``encoder``, mean-pooled patch tokens; ``init_from`` MAE or
unified weights); the network is :class:`idrecog.models.task_classifier.TaskClassifier`, which the resolver
``classifier`` (:mod:`idrecog.data.resolution.classifier`) rebuilds from a trained checkpoint.

Trained with ``idrecog fit --config lightning_configs/task_classifier.yaml``; see docs/task-resolution.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelExactMatch, MultilabelF1Score

from idrecog.errors import ConfigError
from idrecog.lit.optim import fine_tune_optimizers
from idrecog.models.encoder import ViTEncoder, architecture_config
from idrecog.models.queries import module_key
from idrecog.models.task_classifier import TaskClassifier
from idrecog.models.unified import module_config, module_from_config
from idrecog.tasks.catalogue import TaskCatalogue, coerce_catalogue, default_catalogue
from idrecog.utils.checkpoint import plain

__all__ = ["TaskClassifierModule", "load_task_classifier", "task_targets"]

STAGES = ("val", "test")


def task_targets(catalogue: TaskCatalogue, doc_types: Sequence[str | None]) -> tuple[Tensor, Tensor]:
    """Multi-label targets from the ``doc_types`` mapping.

    Returns (targets float [B, T], known bool [B]); rows of samples without a (known) doc type are zero and
    ``known`` is False for them.
    """
    mapping = catalogue.doc_types or {}
    names = catalogue.names
    targets = torch.zeros(len(doc_types), len(names))
    known = torch.zeros(len(doc_types), dtype=torch.bool)
    for i, dt in enumerate(doc_types):
        if dt is None or dt not in mapping:
            continue
        known[i] = True
        applies = set(mapping[dt])
        targets[i] = torch.tensor([n in applies for n in names], dtype=torch.float32)
    return targets, known


class TaskClassifierModule(L.LightningModule):
    """Multi-label task classifier: does task t of the catalogue apply to this image.

    Args:
        catalogue: the catalogue's ``to_dict()`` (the CLI links it from the DataModule); None: the built-in one.
            It needs a ``doc_types`` mapping (the source of the targets).
        backbone: a timm model name (``timm.list_models()``), built with ``pretrained=False, num_classes=0``;
            used when ``encoder`` is None.
        encoder: the shared ViT encoder instead of a timm backbone (``init_from`` an MAE/unified checkpoint);
            its ``img_size`` is the classifier's input size.
        input_size: (H, W) the timm backbone sees; images of another size are resized in :meth:`forward`.
        backbone_kwargs: further keyword arguments of ``timm.create_model``.
        drop_rate: dropout before the linear head.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with linear warm-up and cosine decay.
        encoder_lr_scale, layer_decay: lr of the ViT encoder's blocks (only with ``encoder``).
        threshold: probability above which a task counts as applying, in the logged metrics.
    """

    def __init__(
        self,
        catalogue: dict | None = None,
        backbone: str = "resnet18",
        encoder: ViTEncoder | None = None,
        input_size: tuple[int, int] = (160, 256),
        backbone_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int | float = 20,
        min_lr_ratio: float = 0.01,
        encoder_lr_scale: float = 0.5,
        layer_decay: float = 0.75,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        cat = coerce_catalogue(catalogue) if catalogue is not None else default_catalogue()
        if not cat.doc_types:
            raise ConfigError(
                f"{cat.source}: the task classifier learns the doc_types mapping, but the catalogue has none "
                "(every task applies to every sample: no classifier is needed)"
            )
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"model.threshold must be in (0, 1), got {threshold}")
        enc = module_from_config(encoder, ViTEncoder, "encoder")
        enc_cfg: dict[str, Any] | None = None
        if enc is not None:
            enc_cfg = module_config(enc)
            # the checkpoint holds the weights: rebuilding must not need (or re-read) the pretrained file or hub
            enc_cfg["init_args"] = architecture_config(enc_cfg["init_args"])
        self.net = TaskClassifier(
            len(cat),
            backbone=backbone,
            encoder=enc,
            input_size=input_size,
            backbone_kwargs=backbone_kwargs,
            drop_rate=drop_rate,
        )
        input_size = self.net.input_size
        h, w = (int(v) for v in input_size)
        # plain data only: the checkpoint must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "catalogue": cat.to_dict(),
                "backbone": None if enc is not None else backbone,
                "encoder": enc_cfg,
                "input_size": [h, w],
                "backbone_kwargs": plain(backbone_kwargs),
                "drop_rate": drop_rate,
                "lr": lr,
                "weight_decay": weight_decay,
                "warmup_steps": warmup_steps,
                "min_lr_ratio": min_lr_ratio,
                "encoder_lr_scale": encoder_lr_scale,
                "layer_decay": layer_decay,
                "threshold": threshold,
            }
        )
        self.catalogue = cat
        self.task_names = list(cat.names)
        self.input_size = (h, w)
        t = len(self.task_names)
        self.metrics = nn.ModuleDict(
            {
                stage: MetricCollection(
                    {
                        "f1": MultilabelF1Score(num_labels=t, average=None, threshold=threshold),
                        "exact_match": MultilabelExactMatch(num_labels=t, threshold=threshold),
                    }
                )
                for stage in STAGES
            }
        )
        # exact match over the samples whose doc-type label is present: the image shows its doc type (a sample
        # whose image does not, e.g. no document in view, has no readable task set: it caps exact_match below 1)
        self.doc_type_task = cat.doc_type_task
        self.readable_exact_match = nn.ModuleDict(
            {stage: MultilabelExactMatch(num_labels=t, threshold=threshold) for stage in STAGES}
        )
        # task-set accuracy per doc type: exact match over that doc type's samples
        self.doc_type_names = list(cat.doc_types)
        self.task_set_acc = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {
                        module_key(dt): MultilabelExactMatch(num_labels=t, threshold=threshold)
                        for dt in self.doc_type_names
                    }
                )
                for stage in STAGES
            }
        )

    # ------------------------------------------------------------------ model
    def forward(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] (ImageNet-normalised; resized to ``input_size`` when different) -> logits [N, T]."""
        return self.net(images)

    def predict_proba(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] -> probabilities [N, T] (catalogue order)."""
        return self.net.predict_proba(images)

    # ------------------------------------------------------------------ steps
    def loss(self, logits: Tensor, doc_types: Sequence[str | None]) -> tuple[Tensor, Tensor, Tensor]:
        """BCE-with-logits over the samples whose doc type is known.

        logits: [B, T]; doc_types: B names or None -> (loss, targets float [B, T], known bool [B]).
        """
        targets, known = task_targets(self.catalogue, doc_types)
        targets, known = targets.to(logits.device), known.to(logits.device)
        if known.any():
            loss = F.binary_cross_entropy_with_logits(logits[known].float(), targets[known])
        else:  # no sample with a doc type: nothing to learn, keep the graph connected
            loss = logits.sum() * 0.0
        return loss, targets, known

    def loss_from_sets(self, logits: Tensor, applies: Tensor, known: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """BCE-with-logits against given task sets. applies: bool [B, T]; known: bool [B] -> as :meth:`loss`."""
        targets, known = applies.to(logits.device).float(), known.to(logits.device).bool()
        if known.any():
            loss = F.binary_cross_entropy_with_logits(logits[known].float(), targets[known])
        else:
            loss = logits.sum() * 0.0
        return loss, targets, known

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        logits = self(batch["image"])
        if "applies" in batch and "applies_known" in batch:
            # the DataModule's task sets (an annotated resolver: per sample, not per doc type), where known
            loss, targets, known = self.loss_from_sets(logits, batch["applies"], batch["applies_known"])
        else:
            loss, targets, known = self.loss(logits, batch["doc_type"])
        n = int(known.sum())
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=max(n, 1),
        )
        self.log(f"{stage}/known", float(n), on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)
        if stage in STAGES and n:
            probs = torch.sigmoid(logits.detach().float())
            tgt = targets.long()
            self.metrics[stage].update(probs[known], tgt[known])
            if self.doc_type_task is not None and "present" in batch:
                readable = known & batch["present"][:, self.catalogue.index(self.doc_type_task)]
                if readable.any():
                    self.readable_exact_match[stage].update(probs[readable], tgt[readable])
            for dt in set(d for d in batch["doc_type"] if d is not None and d in self.catalogue.doc_types):
                sel = torch.tensor([d == dt for d in batch["doc_type"]], device=logits.device)
                self.task_set_acc[stage][module_key(dt)].update(probs[sel], tgt[sel])
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """Per sample: ``{"id", "doc_type", "probs": {task: p}, "tasks": [applying tasks]}``."""
        probs = torch.sigmoid(self(batch["image"]).float()).cpu()
        thr = self.hparams.threshold
        ids = batch.get("ids") or [str(i) for i in range(probs.shape[0])]
        doc_types = batch.get("doc_type") or [None] * probs.shape[0]
        return [
            {
                "id": ids[j],
                "doc_type": doc_types[j],
                "probs": {
                    t: round(float(p), 6) for t, p in zip(self.task_names, probs[j].tolist(), strict=True)
                },
                "tasks": [t for t, p in zip(self.task_names, probs[j].tolist(), strict=True) if p >= thr],
            }
            for j in range(probs.shape[0])
        ]

    # ------------------------------------------------------------------ epoch ends
    def _epoch_end(self, stage: str) -> None:
        mc = self.metrics[stage]
        if mc["exact_match"].update_count:
            values = mc.compute()
            for task, f1 in zip(self.task_names, values["f1"].tolist(), strict=True):
                self.log(f"{stage}/{task}/f1", f1)
            self.log(f"{stage}/exact_match", values["exact_match"])
            # the stage's headline number, which the CLI's summary table shows
            self.log(f"{stage}/score", values["exact_match"])
        mc.reset()
        readable = self.readable_exact_match[stage]
        if readable.update_count:
            self.log(f"{stage}/exact_match_readable", readable.compute())
        readable.reset()
        for dt in self.doc_type_names:
            m = self.task_set_acc[stage][module_key(dt)]
            if m.update_count:
                self.log(f"{stage}/task_set_acc/{dt}", m.compute())
            m.reset()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # ------------------------------------------------------------------ summary
    def format_metrics(self, metrics: Mapping[str, float]) -> str:
        """The CLI's end-of-run table: per stage the exact-match figures, then per task "does it apply" F1 and
        per doc type the task-set accuracy (the unified model's per-task-type table does not fit these keys)."""
        lines: list[str] = []
        for stage in ("train", "val", "test"):
            if not any(k.startswith(f"{stage}/") for k in metrics):
                continue
            head = [
                f"{k}={metrics[f'{stage}/{k}']:.4f}"
                for k in ("exact_match", "exact_match_readable", "loss")
                if f"{stage}/{k}" in metrics
            ]
            lines.append(f"[{stage}] " + "  ".join(head))
            rows = [(t, metrics.get(f"{stage}/{t}/f1")) for t in self.task_names]
            rows = [(t, v) for t, v in rows if v is not None]
            sets = [(dt, metrics.get(f"{stage}/task_set_acc/{dt}")) for dt in self.doc_type_names]
            sets = [(dt, v) for dt, v in sets if v is not None]
            for title, pairs in (("task (applies: F1)", rows), ("doc type (task-set accuracy)", sets)):
                if pairs:
                    width = max(len(title), *(len(n) for n, _ in pairs))
                    lines.append(title.ljust(width) + "  value")
                    lines += [f"{n.ljust(width)}  {v:.4f}" for n, v in pairs]
            lines.append("")
        return "\n".join(lines).rstrip() + "\n" if lines else "(no metrics)\n"

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        return fine_tune_optimizers(self, self.net.backbone.vit if self.net.uses_encoder else None, None)


def load_task_classifier(
    ckpt: str | Path | Mapping[str, Any], map_location: str | torch.device = "cpu"
) -> TaskClassifierModule:
    """Rebuild a ``TaskClassifierModule`` from a checkpoint (a path, loaded with ``weights_only=True``, or the
    already loaded dict); a file that is not a task-classifier checkpoint raises ``ConfigError``."""
    from idrecog.utils.checkpoint import load_checkpoint

    where = str(ckpt) if isinstance(ckpt, str | Path) else "<checkpoint>"
    obj = load_checkpoint(ckpt, map_location=map_location) if isinstance(ckpt, str | Path) else ckpt
    hp = plain(obj.get("hyper_parameters") or {})
    if "state_dict" not in obj or "catalogue" not in hp or "input_size" not in hp:
        raise ConfigError(
            f"{where}: not a task-classifier checkpoint (no state_dict, catalogue or input_size)"
        )
    names = set(inspect.signature(TaskClassifierModule.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hp.items() if k in names}
    if kwargs.get("backbone") is None:
        kwargs.pop("backbone", None)
    module = TaskClassifierModule(**kwargs)
    module.net.load_state_dict(TaskClassifier.network_state(obj["state_dict"]), strict=True)
    return module.to(map_location).eval()
