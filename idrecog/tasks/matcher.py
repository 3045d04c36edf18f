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
        bsz, num_queries = logits.shape[:2]
        sizes = [0 if t is None else int(t["labels"].numel()) for t in targets]
        if max(sizes, default=0) > num_queries and not self._warned:
            warnings.warn(
                f"{max(sizes)} target objects but only {num_queries} queries: the assignment is truncated to "
                f"{num_queries}; raise the detection option num_queries",
                stacklevel=2,
            )
            self._warned = True
        rows: list[Tensor] = []
        cols: list[Tensor] = []
        if sum(sizes):
            # one cost matrix for the whole batch, one device-to-host copy (not one per sample)
            present = [t for t in targets if t is not None and t["labels"].numel()]
            tgt_labels = torch.cat([t["labels"] for t in present]).to(logits.device)
            tgt_boxes = torch.cat([t["boxes"] for t in present]).to(logits.device)
            cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), tgt_labels, tgt_boxes)
            chunks = cost.view(bsz, num_queries, -1).cpu().split([n for n in sizes if n], dim=-1)
        else:
            chunks = ()
        it = iter(chunks)
        for n in sizes:
            if n == 0:
                r = c = torch.empty(0, dtype=torch.long)
            else:
                i = len(rows)
                r_np, c_np = linear_sum_assignment(next(it)[i].numpy())
                r, c = torch.as_tensor(r_np, dtype=torch.long), torch.as_tensor(c_np, dtype=torch.long)
            rows.append(r)
            cols.append(c)
        # one host-to-device copy of all indices, split back into per-sample views
        k = [len(r) for r in rows]
        rows_d = torch.cat(rows).to(logits.device, non_blocking=True).split(k)
        cols_d = torch.cat(cols).to(logits.device, non_blocking=True).split(k)
        return list(zip(rows_d, cols_d, strict=True))

    def extra_repr(self) -> str:
        return f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}"
