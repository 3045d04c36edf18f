"""``UnifiedModule``: the LightningModule that trains, evaluates and runs the unified model.

One ``_shared_step`` for train/val/test: forward every catalogue task in one pass (``route="known"``), per-task
losses masked by ``batch["present"]``, balanced total plus the interpreter's gate loss, per-task metrics on
present samples. ``predict_step`` routes with the guidance unit (``route="guided"``). See docs/architecture.md.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MultilabelExactMatch
from typing_extensions import override

from idrecog.errors import ConfigError, NonFiniteLossError
from idrecog.lit.balancing import create_balancer
from idrecog.lit.optim import fine_tune_optimizers
from idrecog.models.decoder import TaskDecoder
from idrecog.models.detail import DetailBranch
from idrecog.models.encoder import ViTEncoder, architecture_config
from idrecog.models.interpreter import OPEN_THRESHOLD, Route, TaskGuidedInterpreter
from idrecog.models.queries import LearnedQueries, TaskQueryProvider, module_key
from idrecog.models.unified import UnifiedModel, module_config, module_from_config
from idrecog.tasks.base import TaskType, metrics_updated
from idrecog.tasks.catalogue import TaskCatalogue, coerce_catalogue, default_catalogue
from idrecog.tasks.registry import create_task_type, get_task_type_class
from idrecog.utils.checkpoint import plain

__all__ = ["UnifiedModule", "format_metrics_table", "load_unified", "score_of"]

STAGES = ("train", "val", "test")
# how a withheld task names the inputs it needs
_INPUT_NAMES = {
    "flash": "flash",
    "angles": "angle frames",
    "user": "user information",
    "user.attributes": "the user's declared details",
    "user.behaviour": "the user's behaviour",
}


class MaskedMean(Metric):
    """Mean of per-batch values weighted by a count (the batch's present samples); DDP-reduced by sum."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, count: Tensor) -> None:
        count = count.to(torch.float64)
        self.total += torch.where(count > 0, value.detach().to(torch.float64) * count, 0.0)
        self.count += count

    def compute(self) -> Tensor:
        return self.total / self.count


def score_of(task_type: TaskType, value: float) -> float:
    """The task's primary metric made higher-is-better, for ``{stage}/score``.

    Higher-is-better metrics are used as they are. Lower-is-better ones are errors in the task's units
    (regression MAE): ``max(0, 1 - value / (high - low))`` with the catalogue ``range``, i.e. one minus the
    error as a fraction of the range width, floored at 0; without a range, ``1 / (1 + value)``.
    """
    if task_type.higher_is_better:
        return float(value)
    rng = task_type.spec.range
    if rng is not None:
        return max(0.0, 1.0 - float(value) / (rng[1] - rng[0]))
    return 1.0 / (1.0 + max(0.0, float(value)))


class UnifiedModule(L.LightningModule):
    """The unified multi-task model for training, evaluation and prediction.

    Args:
        catalogue: the task catalogue's ``to_dict()`` (the CLI links it from the DataModule); None: the built-in
            synthetic catalogue.
        encoder / queries / decoder / interpreter: the parts (None: tiny defaults: ``vit_tiny_patch16_224`` at
            160x256, learned queries, a 2-layer 192-wide decoder, a 128-wide guidance unit).
        detail: a high-resolution branch (:class:`~idrecog.models.detail.DetailBranch`) read by the queries of
            the tasks it names; None: none.
        task_options: per task TYPE (or task name) options, e.g. ``{"detection": {"num_queries": 16}}``.
        task_weights: fixed per-task loss multipliers (default 1).
        balancing: a registered balancer (``idrecog.lit.balancing.list_balancers()``): ``fixed`` |
            ``uncertainty`` (Kendall et al.) | ``dwa`` (Liu et al.) | ``rlw`` | ``gls``, or a gradient balancer
            on the encoder's output tokens: ``pcgrad`` | ``cagrad`` | ``gradnorm`` (docs/architecture.md).
        balancing_options: extra arguments of the balancer (``dwa``: ``temperature``; ``cagrad``: ``c``,
            ``rescale``; ``gradnorm``: ``alpha``; ``pcgrad`` and ``rlw``: ``seed``; ``gls``: ``eps``).
        gate_loss_weight: weight of the guidance unit's cross-entropy.
        gate_train_threshold: with ``data.task_resolver: gate``, a sample without an annotated task set trains a
            task only where the gate's applies probability reaches this (a pseudo-label kept only when
            confident: a gate not yet trained, near 0.5, trains none of them and lets no default label in).
        lr: peak learning rate of the decoder, heads and queries.
        encoder_lr_scale: encoder lr = lr * encoder_lr_scale * layer_decay ** (depth - layer).
        layer_decay: layer-wise lr decay over the ViT blocks (1: none).
        weight_decay: AdamW weight decay (not on biases, norms, position embeddings, tokens, queries).
        warmup_steps: linear warm-up steps (>= 1), or a fraction (< 1) of the total steps.
        min_lr_ratio: the cosine ends at lr * min_lr_ratio.
        fused_adamw: fused AdamW kernel; None: on when every parameter is on CUDA.
        compile: ``torch.compile`` the model's forward (in ``configure_model``).
        user_features: JSON state of the DataModule's user-feature encoder (for user-conditioned queries).
        train_metrics: also compute metrics on the training set (off: faster).
        max_nonfinite_steps: a training step whose loss is NaN or inf is skipped with a warning naming the
            tasks whose loss was non-finite; this many consecutive such steps stop training with
            ``NonFiniteLossError`` (0: stop at the first).
    """

    def __init__(
        self,
        catalogue: dict | None = None,
        encoder: ViTEncoder | None = None,
        queries: TaskQueryProvider | None = None,
        decoder: TaskDecoder | None = None,
        interpreter: TaskGuidedInterpreter | None = None,
        detail: DetailBranch | None = None,
        task_options: dict[str, dict] | None = None,
        task_weights: dict[str, float] | None = None,
        balancing: str = "fixed",
        balancing_options: dict[str, Any] | None = None,
        gate_loss_weight: float = 0.1,
        gate_train_threshold: float = 0.9,
        lr: float = 1e-3,
        encoder_lr_scale: float = 0.5,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        warmup_steps: int | float = 100,
        min_lr_ratio: float = 0.01,
        fused_adamw: bool | None = None,
        compile: bool = False,
        user_features: dict | None = None,
        train_metrics: bool = False,
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        if max_nonfinite_steps < 0:
            raise ConfigError(f"model.max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        if not OPEN_THRESHOLD <= gate_train_threshold < 1:
            raise ConfigError(
                f"model.gate_train_threshold must be in [{OPEN_THRESHOLD}, 1) (the gate's own decision threshold "
                f"up to certainty), got {gate_train_threshold}"
            )
        cat = coerce_catalogue(catalogue) if catalogue is not None else default_catalogue()
        enc = module_from_config(encoder, ViTEncoder, "encoder") or ViTEncoder(
            "vit_tiny_patch16_224", img_size=(160, 256)
        )
        qp = module_from_config(queries, TaskQueryProvider, "queries") or LearnedQueries()
        dec = module_from_config(decoder, TaskDecoder, "decoder") or TaskDecoder(dim=192)
        itp = module_from_config(interpreter, TaskGuidedInterpreter, "interpreter") or TaskGuidedInterpreter()
        det = module_from_config(detail, DetailBranch, "detail")
        enc_cfg = module_config(enc)
        # the checkpoint holds the weights: rebuilding must not need (or re-read) the pretrained file or hub
        enc_cfg["init_args"] = architecture_config(enc_cfg["init_args"])
        # hparams are plain data (no pickled modules), whether the CLI or Python code built this module
        self.save_hyperparameters(
            {
                "catalogue": cat.to_dict(),
                "encoder": enc_cfg,
                "queries": module_config(qp),
                "decoder": module_config(dec),
                "interpreter": module_config(itp),
                "detail": module_config(det) if det is not None else None,
                "task_options": plain(task_options),
                "task_weights": plain(task_weights),
                "balancing": balancing,
                "balancing_options": plain(balancing_options),
                "gate_loss_weight": gate_loss_weight,
                "gate_train_threshold": gate_train_threshold,
                "lr": lr,
                "encoder_lr_scale": encoder_lr_scale,
                "layer_decay": layer_decay,
                "weight_decay": weight_decay,
                "warmup_steps": warmup_steps,
                "min_lr_ratio": min_lr_ratio,
                "fused_adamw": fused_adamw,
                "compile": compile,
                "user_features": plain(user_features),
                "train_metrics": train_metrics,
                "max_nonfinite_steps": max_nonfinite_steps,
            }
        )
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_run = 0  # consecutive training steps with a non-finite loss
        self.catalogue: TaskCatalogue = cat
        self.user_features = user_features
        self.model = UnifiedModel(
            cat, enc, qp, dec, itp, task_options, user_features=user_features, detail=det
        )
        self.task_types: dict[str, TaskType] = self.model.task_types
        # tasks whose options wait for the training split's label counts (settled in setup)
        self._settled_by_counts = {t for t, tt in self.task_types.items() if tt.needs_label_counts}
        self.task_names = list(cat.names)
        self.balancer = create_balancer(
            balancing, self.task_names, task_weights, **dict(balancing_options or {})
        )
        self.metric_stages = STAGES if train_metrics else ("val", "test")
        self.metrics = nn.ModuleDict(
            {
                module_key(stage): nn.ModuleDict(
                    {module_key(t): tt.build_metrics() for t, tt in self.task_types.items()}
                )
                for stage in self.metric_stages
            }
        )
        # the gate's applies decisions: F1 per task, and the exact match of each image's task set (with several
        # tasks; with one, its F1 says it all)
        sets = {}
        if len(self.task_names) > 1:
            sets = {
                "exact_match_": MultilabelExactMatch(num_labels=len(self.task_names)),
                # the images that show a document (its doc-type task applies): the readable ones
                "exact_match_document_": MultilabelExactMatch(num_labels=len(self.task_names)),
            }
        self.gate_metrics = nn.ModuleDict(
            {
                module_key(stage): nn.ModuleDict(
                    {**{module_key(t): BinaryF1Score() for t in self.task_names}, **sets}
                )
                for stage in self.metric_stages
            }
        )
        self.loss_meters = nn.ModuleDict(
            {
                module_key(s): nn.ModuleDict({module_key(t): MaskedMean() for t in self.task_names})
                for s in STAGES
            }
        )
        self._compiled = False

    # ------------------------------------------------------------------ model
    def forward(
        self,
        images: Tensor,
        tasks: list[str] | None = None,
        batch: dict | None = None,
        route: Route = "known",
    ) -> dict[str, Any]:
        """images: [B, 3, H, W] -> see :meth:`UnifiedModel.forward`."""
        return self.model(images, tasks=tasks, batch=batch, route=route)

    def data_requirements(self) -> dict[str, Any]:
        """What the data must provide for this model, decided before any dataset is built (the training CLI
        passes it to ``IdDataModule.configure``): whether the query provider reads associated frames (the
        datasets decode them only then), and the user-feature encoder state the model was built with (None:
        not known yet, see :meth:`setup`)."""
        return {"load_frames": bool(self.model.queries.consumes_frames), "user_features": self.user_features}

    @override
    def setup(self, stage: str) -> None:
        """What the model takes from the data once it exists (after ``prepare_data``), before the optimiser is
        built, stored in its hparams so checkpoints rebuild:

        * a model whose queries embed user information but was built without the user vocabularies (the CLI
          builds it before the data may exist) takes them from the DataModule, fitted on the train split;
        * task options that wait for the training split's label counts (``class_weights: auto``) are settled
          from ``IdDataModule.label_counts`` (:meth:`set_label_counts`). Outside ``fit`` a missing train split is
          not an error: a checkpoint brings the settled numbers (:meth:`on_load_checkpoint`)."""
        needs = getattr(self.model.queries, "needs_user_spec", False)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if needs and self.user_features is None and callable(getattr(dm, "user_features", None)):
            state = dm.user_features()
            self.model.queries.set_user_spec(state)
            self.user_features = state
            self.hparams["user_features"] = plain(state)
        pending = [t for t, tt in self.task_types.items() if tt.needs_label_counts]
        if not pending:
            return
        if not callable(getattr(dm, "label_counts", None)):
            if stage == "fit":
                raise ConfigError(
                    f"tasks {pending}: class_weights 'auto' needs the training split's label counts, which this "
                    "datamodule does not give (no label_counts()); use IdDataModule or give the weights as numbers"
                )
            return
        try:
            counts = dm.label_counts()
        except ConfigError:
            if stage == "fit":
                raise
            return
        self.set_label_counts(counts)

    def set_label_counts(self, counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
        """Settle the task options that wait for label counts (``class_weights: auto``) from ``counts`` =
        ``{task: {class: samples}}`` of the training split; the settled options go into hparams ``task_options``
        under each task's name (a name's options override its type's), so a checkpoint rebuilds with the
        numbers. Returns ``{task: settled options}``."""
        opts = plain(self.hparams.get("task_options") or {})
        settled: dict[str, dict[str, Any]] = {}
        for task, tt in self.task_types.items():
            if not tt.needs_label_counts:
                continue
            task_counts = {str(k): int(v) for k, v in (counts.get(task) or {}).items()}
            settled[task] = tt.set_label_counts(task_counts)
            opts[task] = {**opts.get(task, {}), **settled[task]}
            rank_zero_info(
                f"[idrecog] task {task}: {settled[task]} from the train split's label counts {task_counts}"
            )
        self.hparams["task_options"] = opts
        return settled

    def configure_model(self) -> None:
        if self.hparams.get("compile") and not self._compiled:
            self.model.compile()
            self._compiled = True

    # ------------------------------------------------------------------ steps
    def compute_losses(
        self, out: dict[str, Any], batch: dict[str, Any]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The training objective of a forward output ``out`` (``UnifiedModel.forward`` with route "known").

        Returns (loss [], per-task losses [T] masked by ``batch["present"]``, balancing weights [T], gate loss []).
        Benchmarks call it too, so that what they time is what training optimises.
        """
        present: Tensor = batch["present"].to(batch["image"].device).bool()  # [B, T]
        loss_vec = torch.stack(
            [
                self.task_types[task]
                .loss(out["outputs"][task], batch["targets"][task], present[:, i])
                .float()
                .reshape(())
                for i, task in enumerate(self.task_names)
            ]
        )  # [T]
        if self.balancer.uses_gradients and self.training and torch.is_grad_enabled():
            # gradient balancers read each task's gradient on the encoder's output tokens (docs/architecture.md)
            total, weights = self.balancer(loss_vec, present.any(dim=0), shared=out["tokens"])
        else:
            total, weights = self.balancer(loss_vec, present.any(dim=0))
        target, known, _ = self.gate_targets(out, batch)
        gate_loss = self.model.interpreter.gate_loss(
            out["gate_logits"], out.get("open_logits"), target, known
        )
        return total + self.hparams.gate_loss_weight * gate_loss, loss_vec, weights, gate_loss

    def gate_targets(self, out: dict[str, Any], batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample and task [B, T]: (target, known, available).

        ``available``: the model's own check that a task's required inputs are at hand (supplied, and read by the
        queries). ``target``: the task applies (the data pipeline's ``applies``) with the inputs at hand, i.e.
        ``applies & available``. ``known``: where the applies logit learns: the sample's task set is known
        (``applies_known``; an assumed one teaches nothing) and the inputs are at hand (elsewhere the check
        decides and the logit has nothing to learn)."""
        device = batch["image"].device
        b, t = batch["image"].shape[0], len(self.task_names)
        applies = batch.get("applies")
        applies = (
            torch.ones(b, t, dtype=torch.bool, device=device)
            if applies is None
            else applies.to(device).bool()
        )
        rows = batch.get("applies_known")
        rows = torch.ones(b, dtype=torch.bool, device=device) if rows is None else rows.to(device).bool()
        given = out.get("available") or {}
        ones = torch.ones(b, dtype=torch.bool, device=device)
        available = torch.stack([given.get(task, ones).to(device).bool() for task in self.task_names], dim=1)
        return applies & available, rows[:, None] & available, available

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor | dict[str, Any] | None:
        """train: the loss. val/test: ``{"loss", "outputs" (per task, as forward returns them), "present" [B, T]}``,
        which Lightning hands to callbacks' ``on_{stage}_batch_end`` (per-sample reports without a second
        forward pass, e.g. :class:`~idrecog.callbacks.classification_report.ClassificationReport`)."""
        if "image" not in batch:  # every sample of the batch was dropped (data.on_error: skip)
            return None
        images = batch["image"]
        b = images.shape[0]
        out = self.model(images, batch=batch, route="known")
        self._let_the_gate_decide(out, batch)
        present: Tensor = batch["present"].to(images.device).bool()  # [B, T]
        loss, loss_vec, weights, gate_loss = self.compute_losses(out, batch)
        if stage == "train" and not self._check_finite(loss, loss_vec, gate_loss):
            return None  # Lightning skips backward and the optimiser step; nothing non-finite is logged
        for i, task in enumerate(self.task_names):
            self.loss_meters[module_key(stage)][module_key(task)].update(loss_vec[i], present[:, i].sum())
        on_step = stage == "train"
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=b, sync_dist=True
        )
        self.log(f"{stage}/gate_loss", gate_loss, on_step=False, on_epoch=True, batch_size=b, sync_dist=True)
        self.log(
            f"{stage}/gate_accuracy",
            self.model.interpreter.gate_accuracy(out["gate_logits"]),
            on_step=False,
            on_epoch=True,
            batch_size=b,
            sync_dist=True,
        )
        if stage == "train" and self.hparams.balancing != "fixed":
            for i, task in enumerate(self.task_names):
                self.log(f"train/{task}/weight", weights[i], on_step=False, on_epoch=True, batch_size=b)
        if stage in self.metric_stages:
            for i, task in enumerate(self.task_names):
                self.task_types[task].update_metrics(
                    self.metrics[module_key(stage)][module_key(task)],
                    out["outputs"][task],
                    batch["targets"][task],
                    present[:, i],
                )
            self._update_gate_metrics(stage, out, batch)
        if stage == "train":
            return loss
        return {"loss": loss, "outputs": out["outputs"], "present": present}

    def _let_the_gate_decide(self, out: dict[str, Any], batch: dict[str, Any]) -> None:
        """Samples marked ``gate_decides`` (task resolver ``gate``, task set not annotated) train only the tasks
        the gate opens now with confidence (applies probability >= ``gate_train_threshold``); the decision is
        read, not trained through (the gate learns from annotated samples)."""
        decides = batch.get("gate_decides")
        if decides is None or out.get("open_logits") is None:
            return
        decides = decides.to(batch["present"].device).bool()
        if not decides.any():
            return
        is_open = (self._open_probabilities(out) >= self.hparams.gate_train_threshold).to(decides.device)
        batch["present"] = batch["present"].bool() & (~decides[:, None] | is_open)

    def _open_probabilities(self, out: dict[str, Any]) -> Tensor:
        """The gate's applies probabilities, read without a gradient: [B, T], tasks in catalogue order."""
        return torch.stack([out["open_logits"][t] for t in self.task_names], dim=1).detach().float().sigmoid()

    def _update_gate_metrics(self, stage: str, out: dict[str, Any], batch: dict[str, Any]) -> None:
        """Applies/does-not-apply F1 per task (where the applies logit decides) and the exact match of each image's
        task set with the inputs at hand (the gate's whole decision: applies logit and input check), where the
        task set is known."""
        target, known, available = self.gate_targets(out, batch)
        probs = self._open_probabilities(out)
        gm = self.gate_metrics[module_key(stage)]
        for i, task in enumerate(self.task_names):
            sel = known[:, i]
            if sel.any():
                gm[module_key(task)].update(probs[sel, i], target[sel, i].long())
        if "exact_match_" not in gm:
            return
        rows = batch.get("applies_known")
        rows = known.any(dim=1) if rows is None else rows.to(known.device).bool()
        decided = ((probs >= OPEN_THRESHOLD) & available).float()
        if rows.any():
            gm["exact_match_"].update(decided[rows], target[rows].long())
        dt = self.catalogue.doc_type_task
        if dt is not None:
            doc_rows = rows & target[:, self.task_names.index(dt)]
            if doc_rows.any():
                gm["exact_match_document_"].update(decided[doc_rows], target[doc_rows].long())

    def _check_finite(self, loss: Tensor, loss_vec: Tensor, gate_loss: Tensor) -> bool:
        """False (and a warning naming the tasks) for a non-finite loss; raises after too many in a row.

        One ``isfinite`` sync per step: the price of never stepping the optimiser on NaN gradients."""
        if bool(torch.isfinite(loss)):
            self._nonfinite_run = 0
            return True
        self._nonfinite_run += 1
        bad = [
            t
            for t, v in zip(self.task_names, loss_vec.detach().cpu().tolist(), strict=True)
            if v != v or abs(v) == float("inf")
        ]
        if not torch.isfinite(gate_loss):
            bad.append("<gate>")
        what = ", ".join(bad) or "<balancer>"
        k = self.max_nonfinite_steps
        if self._nonfinite_run > k:
            raise NonFiniteLossError(
                f"non-finite loss in {self._nonfinite_run} consecutive training steps (global step "
                f"{self.global_step}; tasks: {what}); stopped (model.max_nonfinite_steps={k}). Lower the "
                "learning rate, check those tasks' labels, or resume from an earlier checkpoint"
            )
        warnings.warn(
            f"non-finite training loss at global step {self.global_step} (tasks: {what}): step skipped "
            f"({self._nonfinite_run} in a row; training stops after {k})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "train")  # type: ignore[return-value]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        return self._shared_step(batch, "val")  # type: ignore[return-value]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        return self._shared_step(batch, "test")  # type: ignore[return-value]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse (``ConfigError`` listing the differing tasks) a checkpoint trained on another catalogue,
        before any weight is loaded or any step runs (``idrecog fit --ckpt_path``)."""
        hp = checkpoint.get("hyper_parameters") or {}
        if "catalogue" not in hp:
            return
        stored = TaskCatalogue.from_dict(plain(hp["catalogue"]), source="the checkpoint")
        diff = stored.diff(TaskCatalogue.from_dict(self.catalogue.to_dict(), source="the data"))
        if diff:
            raise ConfigError(
                "the checkpoint was trained on another task catalogue than the data's tasks.yaml "
                "(catalogue differs): " + "; ".join(diff)
            )
        self._restore_settled_options(plain(hp.get("task_options") or {}))

    def _restore_settled_options(self, stored: Mapping[str, Any]) -> None:
        """Options settled from label counts when the checkpoint was trained (``class_weights: auto``) are the
        checkpoint's numbers, not the current data's: the task types are rebuilt with them, and so are hparams."""
        opts = plain(self.hparams.get("task_options") or {})
        for task, tt in list(self.task_types.items()):
            if task not in self._settled_by_counts or task not in stored:
                continue
            merged = {**tt.options, **dict(stored[task])}
            # the dict is the model's own: forward, losses and metrics read the rebuilt type
            self.task_types[task] = create_task_type(tt.spec, **merged)
            opts[task] = {**opts.get(task, {}), **dict(stored[task])}
        self.hparams["task_options"] = opts

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """Per sample, over its applying tasks (``batch["applies"]``; all tasks without it)::

            {"id", "doc_type",
             "outputs": {task: postprocessed output},            # the tasks the gate let out
             "withheld": {task: why not},                        # the others, with the reason
             "routing": {task: {"routed", "open", "open_probability", "gate", "gate_probability"}}}

        A task is withheld with ``needs <inputs>`` when its required inputs are missing (never answered from the
        main image), ``gate closed`` when the guidance unit judged it does not apply, ``gate opened <type>`` when it
        opened another type's unit. One guided forward pass (``route="guided"``)."""
        images = batch["image"]
        b = images.shape[0]
        out = self.model(images, batch=batch, route="guided")
        applies = batch.get("applies")
        applies = (
            torch.ones(b, len(self.task_names), dtype=torch.bool) if applies is None else applies.bool().cpu()
        )
        ids = batch.get("ids") or [str(i) for i in range(b)]
        doc_types = batch.get("doc_type") or [None] * b
        types = self.model.interpreter.type_names
        cols: dict[str, dict[str, list[Any]]] = {}
        post: dict[str, list[dict[str, Any]]] = {}
        for i, task in enumerate(self.task_names):
            if not applies[:, i].any():
                continue
            post[task] = self.task_types[task].postprocess(out["outputs"][task])
            p = out["gate_logits"][task].detach().float().softmax(-1).cpu()
            avail = out["available"].get(task)
            cols[task] = {
                "routed": out["routed"][task].cpu().tolist(),
                "pick": p.argmax(-1).tolist(),
                "pick_p": p.max(-1).values.tolist(),
                "open_p": out["open_logits"][task].detach().float().sigmoid().cpu().tolist(),
                "avail": avail.cpu().tolist() if avail is not None else [True] * b,
            }
        needs = {
            t: "needs " + " and ".join(_INPUT_NAMES[r] for r in self.catalogue[t].requires) for t in cols
        }
        results = []
        for j in range(b):
            r: dict[str, Any] = {
                "id": ids[j],
                "doc_type": doc_types[j],
                "outputs": {},
                "withheld": {},
                "routing": {},
            }
            for task, c in cols.items():
                if not applies[j, self.task_names.index(task)]:
                    continue
                gate, is_open = types[c["pick"][j]], c["open_p"][j] >= OPEN_THRESHOLD
                if c["routed"][j]:
                    r["outputs"][task] = post[task][j]
                elif not c["avail"][j]:
                    r["withheld"][task] = needs[task]
                elif not is_open:
                    r["withheld"][task] = "gate closed"
                else:
                    r["withheld"][task] = f"gate opened {gate}"
                r["routing"][task] = {
                    "routed": bool(c["routed"][j]),
                    "open": bool(is_open),
                    "open_probability": round(float(c["open_p"][j]), 6),
                    "gate": gate,
                    "gate_probability": round(float(c["pick_p"][j]), 6),
                }
            results.append(r)
        return results

    # ------------------------------------------------------------------ epoch ends
    def _epoch_end(self, stage: str) -> None:
        for task in self.task_names:
            meter = self.loss_meters[module_key(stage)][module_key(task)]
            # compute on every rank (it syncs); NaN where no sample of the stage had the task's label
            value = meter.compute().float()
            meter.reset()
            if torch.isfinite(value):
                self.log(f"{stage}/{task}/loss", value)
        if stage not in self.metric_stages:
            return
        scores = []
        for task, tt in self.task_types.items():
            mc = self.metrics[module_key(stage)][module_key(task)]
            values = tt.compute_metrics(mc)
            mc.reset()
            for key, value in values.items():
                self.log(f"{stage}/{task}/{key}", value)
            # a task whose label depends on inputs these queries never read is logged but not scored
            if tt.primary_metric in values and self.model.queries.reads(tt.spec.requires):
                scores.append(score_of(tt, float(values[tt.primary_metric])))
        if scores:
            self.log(f"{stage}/score", float(sum(scores) / len(scores)))
        gm = self.gate_metrics[module_key(stage)]
        for task in self.task_names:
            if metrics_updated(MetricCollection({"f1": gm[module_key(task)]})):
                self.log(f"{stage}/{task}/gate_f1", gm[module_key(task)].compute())
            gm[module_key(task)].reset()
        for key, name in (
            ("exact_match_", "gate_exact_match"),
            ("exact_match_document_", "gate_exact_match_document"),
        ):
            if key not in gm:
                continue
            if metrics_updated(MetricCollection({"em": gm[key]})):
                self.log(f"{stage}/{name}", gm[key].compute())
            gm[key].reset()

    def on_train_epoch_end(self) -> None:
        self.balancer.epoch_end()
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        return fine_tune_optimizers(self, self.model.encoder.vit, self.hparams.fused_adamw)


def load_unified(
    ckpt_path: str | Path,
    map_location: str | torch.device = "cpu",
    catalogue: TaskCatalogue | Mapping[str, Any] | str | Path | None = None,
) -> UnifiedModule:
    """Rebuild a ``UnifiedModule`` from a checkpoint loaded with ``weights_only=True`` (no code from the file).

    With ``catalogue``, a checkpoint trained on a different catalogue (task names, types, classes) is refused
    with a ``ConfigError`` listing the differing tasks.
    """
    from idrecog.utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path, map_location=map_location)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if "state_dict" not in ckpt or "catalogue" not in hp:
        raise ConfigError(
            f"{ckpt_path}: not a unified-model checkpoint (no state_dict or no catalogue in its hparams)"
        )
    stored = TaskCatalogue.from_dict(plain(hp["catalogue"]), source=str(ckpt_path))
    if catalogue is not None:
        given = coerce_catalogue(catalogue)
        diff = stored.diff(given)
        if diff:
            raise ConfigError(
                f"{ckpt_path}: the checkpoint's task catalogue differs from {given.source}: "
                + "; ".join(diff)
            )
    names = set(inspect.signature(UnifiedModule.__init__).parameters) - {"self"}
    kwargs = {k: plain(v) if isinstance(v, Mapping) else v for k, v in hp.items() if k in names}
    module = UnifiedModule(**kwargs)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.to(map_location).eval()


def format_metrics_table(
    metrics: Mapping[str, float | Tensor], catalogue: TaskCatalogue | Mapping[str, Any] | None = None
) -> str:
    """A per-stage, per-task table of ``{stage}/{task}/{metric}`` values (task, type, primary, all metrics),
    headed by the stage's score, gate accuracy and loss. Tasks in catalogue order; without a catalogue, in
    key order with unknown types."""
    cat = (
        coerce_catalogue(catalogue)
        if catalogue is not None and not isinstance(catalogue, TaskCatalogue)
        else catalogue
    )
    vals = {k: float(v) for k, v in metrics.items()}
    stages = [s for s in ("train", "val", "test") if any(k.startswith(f"{s}/") for k in vals)]
    lines: list[str] = []
    for stage in stages:
        per_task: dict[str, dict[str, float]] = {}
        for key, v in vals.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == stage:
                per_task.setdefault(parts[1], {})[parts[2]] = v
        head = [
            f"{k}={vals[f'{stage}/{k}']:.4f}"
            for k in ("score", "gate_exact_match", "gate_exact_match_document", "gate_accuracy", "loss")
            if f"{stage}/{k}" in vals
        ]
        lines.append(f"[{stage}] " + "  ".join(head))
        order = [t for t in cat.names if t in per_task] if cat is not None else []
        order += [t for t in per_task if t not in order]
        rows = [("task", "type", "primary", "metrics")]
        for task in order:
            ttype, primary = "-", ""
            if cat is not None and task in cat:
                ttype = cat[task].type
                try:
                    pm = get_task_type_class(ttype).primary_metric
                    if pm in per_task[task]:
                        primary = f"{pm}={per_task[task][pm]:.4f}"
                except ConfigError:
                    pass
            rest = "  ".join(f"{k}={v:.4f}" for k, v in sorted(per_task[task].items()))
            rows.append((task, ttype, primary, rest))
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        for r in rows:
            lines.append("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else "(no metrics)\n"
