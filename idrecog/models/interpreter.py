"""The task-guided interpreter: per sample and task, a gate decides whether the task's result comes out, and of
which output unit.

Output units are grouped by task TYPE: ``units[type][task]`` is the head of ``task`` (``build_head(dim)``). The
task-guidance unit (a small MLP over the mean of a task's query features) gives, per sample and task, an
**applies** logit (does the task apply to this image: a document in view, the feature present) and one logit per
type (which unit receives the task's features). The gate is **open** where the task applies and its required
inputs (catalogue ``requires``: frames, user information) are at hand.

* ``route="known"`` (training): every head's output is used (losses are masked per sample and task); the gate
  learns alongside (:meth:`TaskGuidedInterpreter.gate_loss`): a binary cross-entropy of the applies logit against
  the per-sample applicability the data pipeline computes (masked where it is unknown), and a cross-entropy of the
  type logits against the task's catalogue type.
* ``route="guided"`` (inference): a task's result comes out where its gate is open, its required inputs are at
  hand and the type it opens has the task's unit; ``routed[task][i]`` is False otherwise, and consumers withhold
  that output. A task whose required inputs are missing is never answered (its gate is closed outright).

Heads run on the whole batch either way (no data-dependent control flow, so the model exports).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idrecog.errors import ConfigError
from idrecog.models.queries import module_key
from idrecog.tasks.base import HeadContext, TaskType

__all__ = ["Route", "TaskGuidedInterpreter"]

#: the open/close decision threshold on the gate's open probability
OPEN_THRESHOLD = 0.5

Route = Literal["known", "guided"]


class TaskGuidedInterpreter(nn.Module):
    """Output units per task type, and the guidance unit that routes to them.

    Args:
        guidance_hidden: hidden width of the guidance MLP.
    """

    def __init__(self, guidance_hidden: int = 128) -> None:
        super().__init__()
        self.init_args: dict[str, Any] = {"guidance_hidden": guidance_hidden}
        self.guidance_hidden = guidance_hidden
        self.type_names: list[str] = []
        self.task_type_index: dict[str, int] = {}
        self.units = nn.ModuleDict()
        self.guidance: nn.Module = nn.Identity()

    def build(self, task_types: dict[str, TaskType], dim: int) -> None:
        """Create one output-unit group per task type, holding each task's head, and the guidance unit."""
        self.type_names = list(dict.fromkeys(tt.spec.type for tt in task_types.values()))
        for type_name in self.type_names:
            group = nn.ModuleDict()
            for task, tt in task_types.items():
                if tt.spec.type == type_name:
                    group[module_key(task)] = tt.build_head(dim)
            self.units[module_key(type_name)] = group
        self.task_type_index = {t: self.type_names.index(tt.spec.type) for t, tt in task_types.items()}
        self.guidance = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, self.guidance_hidden),
            nn.GELU(),
            nn.Linear(self.guidance_hidden, 1 + len(self.type_names)),
        )

    def has_unit(self, task: str, type_name: str) -> bool:
        return module_key(task) in self.units[module_key(type_name)]

    def head(self, task: str) -> nn.Module:
        """The output unit of ``task`` (in its catalogue type's group)."""
        group = self.units[module_key(self.type_names[self.task_type_index[task]])]
        return group[module_key(task)]

    def forward(
        self,
        task_feats: dict[str, Tensor],
        ctx: HeadContext,
        route: Route = "known",
        available: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """task_feats: {task: [B, Q_t, dim]}; available: {task: bool [B]} whether its required inputs are at hand
        (None: all are) -> (outputs {task: head dict}, gate_logits {task: [B, n_types]}, open_logits {task: [B]}:
        the applies logit, routed {task: bool [B]})."""
        if route not in ("known", "guided"):
            raise ConfigError(f"route must be 'known' or 'guided', got {route!r}")
        outputs: dict[str, dict[str, Tensor]] = {}
        gate_logits: dict[str, Tensor] = {}
        open_logits: dict[str, Tensor] = {}
        routed: dict[str, Tensor] = {}
        for task, feats in task_feats.items():
            b = feats.shape[0]
            ok = torch.ones(b, dtype=torch.bool, device=feats.device)
            if available is not None and task in available:
                ok = available[task].to(feats.device).bool()
            logits = self.guidance(feats.mean(dim=1))
            open_logits[task], gate_logits[task] = logits[:, 0], logits[:, 1:]
            if route == "known":
                routed[task] = torch.ones(b, dtype=torch.bool, device=feats.device)
            else:
                # a task has a unit only in its own type's group: any other pick withholds the output
                has = torch.tensor(
                    [self.has_unit(task, t) for t in self.type_names], dtype=torch.bool, device=feats.device
                )
                is_open = torch.sigmoid(open_logits[task].float()) >= OPEN_THRESHOLD
                routed[task] = has[gate_logits[task].argmax(dim=-1)] & is_open & ok
            outputs[task] = self.head(task)(feats, ctx)
        return outputs, gate_logits, open_logits, routed

    def known_targets(self, tasks: list[str], batch_size: int, device: torch.device | None = None) -> Tensor:
        """The known type index of each task, broadcast over the batch: [B, T]."""
        idx = torch.tensor([self.task_type_index[t] for t in tasks], dtype=torch.long, device=device)
        return idx.unsqueeze(0).expand(batch_size, -1)

    def gate_loss(
        self,
        gate_logits: dict[str, Tensor],
        open_logits: dict[str, Tensor] | None = None,
        open_target: Tensor | None = None,
        open_known: Tensor | None = None,
    ) -> Tensor:
        """Cross-entropy of the type logits against each task's catalogue type, plus the binary cross-entropy of
        the open logits against ``open_target`` [B, T] (tasks in ``gate_logits``' order), over the (sample, task)
        pairs where ``open_known`` [B, T] is True (all when None); no open term without a target."""
        tasks = list(gate_logits)
        logits = torch.stack([gate_logits[t] for t in tasks], dim=1)  # [B, T, n_types]
        target = self.known_targets(tasks, logits.shape[0], logits.device)
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        if open_logits is None or open_target is None:
            return loss
        opened = torch.stack([open_logits[t] for t in tasks], dim=1).float()  # [B, T]
        known = torch.ones_like(opened, dtype=torch.bool) if open_known is None else open_known.bool()
        per = F.binary_cross_entropy_with_logits(opened, open_target.to(opened.dtype), reduction="none")
        return loss + (per * known).sum() / known.sum().clamp(min=1)

    def gate_accuracy(self, gate_logits: dict[str, Tensor]) -> Tensor:
        """Fraction of (sample, task) pairs whose argmax group is the task's known type."""
        tasks = list(gate_logits)
        logits = torch.stack([gate_logits[t] for t in tasks], dim=1)
        target = self.known_targets(tasks, logits.shape[0], logits.device)
        return (logits.argmax(-1) == target).float().mean()
