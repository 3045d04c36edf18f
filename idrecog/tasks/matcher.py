"""Hungarian matching of predicted objects to ground-truth objects (DETR), one optimal assignment per sample.

The cost of pairing query i with target j is::

    cost_class * (-p_i[label_j]) + cost_bbox * ||box_i - box_j||_1 + cost_giou * (-GIoU(box_i, box_j))

with boxes normalised cxcywh in [0, 1]; ``scipy.optimize.linear_sum_assignment`` minimises the summed cost.

More targets than queries: the assignment is truncated, not an error. ``linear_sum_assignment`` on the
rectangular [N, n] cost matrix matches every query to a distinct target, choosing the N targets whose
pairing is cheapest overall; the other targets get no query (and so no box loss) and a warning is issued
once. Raise ``num_queries`` (the detection option) above the largest object count to avoid it.
"""

from __future__ import annotations

import warnings

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets (no parameters; runs without gradients).

    cost_class, cost_bbox, cost_giou: weights of the three cost terms (DETR uses 1, 5, 2).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self._warned = False

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Pairing costs of one sample.

        logits: [N, C + 1] (last = no-object); boxes: [N, 4] cxcywh normalised;
        tgt_labels: [n] class indices; tgt_boxes: [n, 4] cxcywh normalised -> [N, n].
        """
        prob = logits.float().softmax(-1)
        c_class = -prob[:, tgt_labels]
        c_bbox = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        c_giou = -generalized_box_iou(
            box_convert(boxes.float(), "cxcywh", "xyxy"), box_convert(tgt_boxes.float(), "cxcywh", "xyxy")
        )
        return self.cost_class * c_class + self.cost_bbox * c_bbox + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor] | None]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every sample of the batch.

        logits: [B, N, C + 1]; boxes: [B, N, 4] cxcywh normalised; targets: B entries of
        {"labels": [n], "boxes": [n, 4] cxcywh normalised}, or None (absent: no match).
        Returns B pairs (query_idx [k], target_idx [k]) of LongTensors on ``logits``' device,
        k = min(N, n), sorted by query index.
        """
        if logits.shape[0] != len(targets):
            raise ValueError(f"{logits.shape[0]} predictions but {len(targets)} targets")
        out: list[tuple[Tensor, Tensor]] = []
        empty = torch.empty(0, dtype=torch.long, device=logits.device)
        num_queries = logits.shape[1]
        for i, t in enumerate(targets):
            if t is None or t["labels"].numel() == 0:
                out.append((empty, empty))
                continue
            n = t["labels"].numel()
            if n > num_queries and not self._warned:
                warnings.warn(
                    f"{n} target objects but only {num_queries} queries: the assignment is truncated to "
                    f"{num_queries}; raise the detection option num_queries",
                    stacklevel=2,
                )
                self._warned = True
            cost = self.cost_matrix(logits[i], boxes[i], t["labels"], t["boxes"]).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            out.append(
                (
                    torch.as_tensor(rows, dtype=torch.long, device=logits.device),
                    torch.as_tensor(cols, dtype=torch.long, device=logits.device),
                )
            )
        return out

    def extra_repr(self) -> str:
        return f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}"
