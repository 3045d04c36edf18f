"""The task-guided interpreter: routes each task's decoded features to an output unit.

Output units are grouped by task TYPE: ``units[type][task]`` is the head of ``task`` (``build_head(dim)``).
A task-guidance unit (a small MLP over the mean of a task's query features) scores the groups, one logit per
type present in the catalogue, and a gate opens one group per sample:

* ``route="known"`` (training): the gate follows the task's catalogue type;
* ``route="guided"`` (inference): the gate opens the argmax group. Where that group has no unit for the task,
  the sample's output for the task is withheld: ``routed[task][i]`` is False. Another unit is never used.

Heads run on the whole batch either way (no data-dependent control flow, so the model exports); consumers
drop the samples whose ``routed`` is False. The guidance unit is trained with an auxiliary cross-entropy
(``gate_loss``) against the known type.
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
            nn.Linear(self.guidance_hidden, len(self.type_names)),
        )

    def has_unit(self, task: str, type_name: str) -> bool:
        return module_key(task) in self.units[module_key(type_name)]

    def head(self, task: str) -> nn.Module:
        """The output unit of ``task`` (in its catalogue type's group)."""
        group = self.units[module_key(self.type_names[self.task_type_index[task]])]
        return group[module_key(task)]

    def forward(
        self, task_feats: dict[str, Tensor], ctx: HeadContext, route: Route = "known"
    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], dict[str, Tensor]]:
        """task_feats: {task: [B, Q_t, dim]} -> (outputs {task: head dict}, gate_logits {task: [B, n_types]},
        routed {task: bool [B]})."""
        if route not in ("known", "guided"):
            raise ConfigError(f"route must be 'known' or 'guided', got {route!r}")
        outputs: dict[str, dict[str, Tensor]] = {}
        gate_logits: dict[str, Tensor] = {}
        routed: dict[str, Tensor] = {}
        for task, feats in task_feats.items():
            logits = self.guidance(feats.mean(dim=1))
            gate_logits[task] = logits
            if route == "known":
                routed[task] = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
            else:
                # a task has a unit only in its own type's group: any other pick withholds the output
                has = torch.tensor(
                    [self.has_unit(task, t) for t in self.type_names], dtype=torch.bool, device=feats.device
                )
                routed[task] = has[logits.argmax(dim=-1)]
            outputs[task] = self.head(task)(feats, ctx)
        return outputs, gate_logits, routed

    def known_targets(self, tasks: list[str], batch_size: int, device: torch.device | None = None) -> Tensor:
        """The known type index of each task, broadcast over the batch: [B, T]."""
        idx = torch.tensor([self.task_type_index[t] for t in tasks], dtype=torch.long, device=device)
        return idx.unsqueeze(0).expand(batch_size, -1)

    def gate_loss(self, gate_logits: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy of the guidance logits against each task's known type index."""
        tasks = list(gate_logits)
        logits = torch.stack([gate_logits[t] for t in tasks], dim=1)  # [B, T, n_types]
        target = self.known_targets(tasks, logits.shape[0], logits.device)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def gate_accuracy(self, gate_logits: dict[str, Tensor]) -> Tensor:
        """Fraction of (sample, task) pairs whose argmax group is the task's known type."""
        tasks = list(gate_logits)
        logits = torch.stack([gate_logits[t] for t in tasks], dim=1)
        target = self.known_targets(tasks, logits.shape[0], logits.device)
        return (logits.argmax(-1) == target).float().mean()
