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
from torch.nn.utils.rnn import pad_sequence
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
        return self.batched_cost(logits[None], boxes[None], tgt_labels[None], tgt_boxes[None])[0]

    @torch.no_grad()
    def batched_cost(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Pairing costs of each sample with its own targets only (targets padded to a common count).

        logits: [B, N, C + 1]; boxes: [B, N, 4]; tgt_labels: [B, M]; tgt_boxes: [B, M, 4] -> [B, N, M].
        Only the per-sample blocks are computed: DETR's batch-wide [B * N, sum n] matrix grows with B^2 and
        its copy to the host dominated the matcher at GPU batch sizes.
        """
        prob = logits.float().softmax(-1)
        c_class = -prob.gather(2, tgt_labels[:, None, :].expand(-1, prob.shape[1], -1))
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        c_bbox = (boxes[:, :, None, :] - tgt_boxes[:, None, :, :]).abs().sum(-1)
        c_giou = -torch.vmap(generalized_box_iou)(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
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
        num_queries = logits.shape[1]
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
        blocks: Tensor | tuple[()] = ()
        if sum(sizes):
            # the present samples' own blocks, targets padded to the largest count; one device-to-host copy
            keep = [i for i, n in enumerate(sizes) if n]
            kept = [targets[i] for i in keep]
            dev = logits.device
            labels = pad_sequence([t["labels"] for t in kept], batch_first=True).to(dev)  # type: ignore[index]
            # padding 0.5 makes a valid box (w = h = 0.5), so GIoU stays finite; padded columns are sliced off
            tboxes = pad_sequence(
                [t["boxes"].float() for t in kept],  # type: ignore[index]
                batch_first=True,
                padding_value=0.5,
            ).to(dev)
            blocks = self.batched_cost(logits[keep], boxes[keep], labels, tboxes).cpu()
        it = iter(blocks)
        for n in sizes:
            if n == 0:
                r = c = torch.empty(0, dtype=torch.long)
            else:
                r_np, c_np = linear_sum_assignment(next(it)[:, :n].numpy())
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
