"""Per-class numbers and confusion matrices of the classification tasks, at the end of validation and test.

The epoch metrics (``val/doc_type/accuracy``, ``f1_macro``...) say how well a task does, not which classes it
confuses. This callback accumulates, per classification task, a torchmetrics ``MulticlassConfusionMatrix`` and
per-class precision, recall and F1 (``average=None``) from what ``UnifiedModule``'s validation and test steps
return (each task's logits and the ``present`` mask: no second forward pass), and at the stage's end writes
under ``output_dir/<stage>/``:

* ``<task>_per_class.csv``: class, precision, recall, f1, support (labelled samples of the class);
* ``<task>_confusion.csv``: counts, one row per true class, one column per predicted class;
* ``<task>_confusion.png``: the matrix, rows normalised to the true class (counts written in the cells);

and, with a ``WandbLogger``, the picture and the per-class table under ``<stage>/<task>/``. Validation files
hold the latest validation (W&B keeps the history by step). Under DDP the metrics sync across ranks; rank 0
writes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from idrecog.errors import ConfigError
from idrecog.tasks.base import metrics_updated
from idrecog.tasks.classification import Classification

__all__ = ["ClassificationReport", "write_confusion_png"]

STAGES = ("val", "test")


class ClassificationReport(Callback):
    """Confusion matrices and per-class precision / recall / F1 of every classification task.

    Args:
        output_dir: where ``<stage>/<task>_*.csv|png`` go; None: the logger's ``log_dir``, else
            ``{default_root_dir}/reports``.
        stages: which of ``val`` and ``test`` to report.
        tasks: the tasks to report (None: every task of type ``classification``).
        plot: also draw ``<task>_confusion.png`` (matplotlib).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        stages: Sequence[str] = STAGES,
        tasks: Sequence[str] | None = None,
        plot: bool = True,
    ) -> None:
        bad = sorted(set(stages) - set(STAGES))
        if bad:
            raise ConfigError(f"ClassificationReport.stages: {bad} not among {list(STAGES)}")
        self.output_dir = output_dir
        self.stages = tuple(stages)
        self.tasks = None if tasks is None else list(tasks)
        self.plot = plot
        self._metrics: dict[str, MetricCollection] = {}
        self._classes: dict[str, list[str]] = {}
        #: paths written by the last report of each stage (for callers and tests)
        self.written: dict[str, list[Path]] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        types = getattr(pl_module, "task_types", None)
        catalogue = getattr(pl_module, "catalogue", None)
        if not isinstance(types, dict) or catalogue is None:
            return  # not a UnifiedModule: nothing to report
        names = [n for n, tt in types.items() if isinstance(tt, Classification)]
        if self.tasks is not None:
            unknown = sorted(set(self.tasks) - set(names))
            if unknown:
                raise ConfigError(
                    f"ClassificationReport.tasks: {unknown} are not classification tasks of the catalogue "
                    f"({names})"
                )
            names = [n for n in names if n in self.tasks]
        self._classes = {n: list(catalogue[n].classes or ()) for n in names}
        self._metrics = {n: self._build(len(c)).to(pl_module.device) for n, c in self._classes.items()}

    @staticmethod
    def _build(num_classes: int) -> MetricCollection:
        return MetricCollection(
            {
                "confusion": MulticlassConfusionMatrix(num_classes=num_classes),
                "precision": MulticlassPrecision(num_classes=num_classes, average=None),
                "recall": MulticlassRecall(num_classes=num_classes, average=None),
                "f1": MulticlassF1Score(num_classes=num_classes, average=None),
            }
        )

    # ------------------------------------------------------------------ accumulate
    # one implementation serves validation and test: the stage comes from ``trainer.testing``
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        stage = "test" if trainer.testing else "val"
        if stage not in self.stages or trainer.sanity_checking or not isinstance(outputs, dict):
            return
        if "outputs" not in outputs or "present" not in outputs:
            return
        present: Tensor = outputs["present"]
        task_names: list[str] = list(pl_module.task_names)  # type: ignore[arg-type]
        for task, metrics in self._metrics.items():
            idx = present[:, task_names.index(task)].nonzero(as_tuple=True)[0]
            if idx.numel():
                logits = outputs["outputs"][task]["logits"][idx].detach()
                target = batch["targets"][task].to(logits.device)[idx]
                metrics.to(logits.device).update(logits, target)

    on_test_batch_end = on_validation_batch_end

    # ------------------------------------------------------------------ report
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "test" if trainer.testing else "val")

    on_test_epoch_end = on_validation_epoch_end

    def _dir(self, trainer: Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        log_dir = getattr(trainer.logger, "log_dir", None)
        return Path(log_dir) if log_dir else Path(trainer.default_root_dir) / "reports"

    def _report(self, trainer: Trainer, stage: str) -> None:
        if stage not in self.stages:
            return
        results: dict[str, dict[str, Tensor]] = {}
        for task, metrics in self._metrics.items():
            # every rank computes (a collective under DDP), also a rank that saw no labelled sample
            if metrics_updated(metrics):
                results[task] = {k: v.detach().cpu() for k, v in metrics.compute().items()}
            metrics.reset()
        if not trainer.is_global_zero or not results:
            return
        out = self._dir(trainer) / stage
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for task, res in results.items():
            classes = self._classes[task]
            cm = res["confusion"].long()
            rows = [
                [
                    c,
                    float(res["precision"][i]),
                    float(res["recall"][i]),
                    float(res["f1"][i]),
                    int(cm[i].sum()),
                ]
                for i, c in enumerate(classes)
            ]
            per_class = out / f"{task}_per_class.csv"
            _write_csv(per_class, ["class", "precision", "recall", "f1", "support"], rows)
            confusion = out / f"{task}_confusion.csv"
            _write_csv(
                confusion,
                ["true \\ predicted", *classes],
                [[c, *cm[i].tolist()] for i, c in enumerate(classes)],
            )
            written += [per_class, confusion]
            png = None
            if self.plot:
                png = write_confusion_png(cm, classes, out / f"{task}_confusion.png", f"{stage} {task}")
                written.append(png)
            self._log_wandb(trainer, f"{stage}/{task}", rows, png)
        self.written[stage] = written

    @staticmethod
    def _log_wandb(trainer: Trainer, key: str, rows: list[list[Any]], png: Path | None) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                step = trainer.global_step
                logger.log_table(
                    key=f"{key}/per_class",
                    columns=["class", "precision", "recall", "f1", "support"],
                    data=[[r[0], round(r[1], 6), round(r[2], 6), round(r[3], 6), r[4]] for r in rows],
                    step=step,
                )
                if png is not None:
                    logger.log_image(key=f"{key}/confusion_matrix", images=[str(png)], step=step)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in r])


def write_confusion_png(cm: Tensor, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """``cm`` [C, C] counts (rows: true class) -> a PNG, colours normalised per row, counts in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = cm.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig = Figure(figsize=(1.6 + 0.55 * n, 1.2 + 0.5 * n), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), list(classes), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), list(classes), fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    for i in range(n):
        for j in range(n):
            colour = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
