"""Detection: N object queries, each a class (or no-object) and a box; DETR set loss with Hungarian matching.

Boxes: targets are xyxy in image pixels; the head predicts normalised cxcywh in [0, 1]. The loss does not
receive the ``HeadContext``, so the head also returns ``image_size`` ([B, 2] long, (H, W) of the network
input, one row per sample so that every output stays indexable by sample); ``loss``, ``update_metrics`` and
``postprocess`` convert between pixels and normalised boxes with it.

Options: ``num_queries`` (16), ``eos_coef`` (0.1, cross-entropy weight of the no-object class),
``loss_class`` / ``loss_bbox`` / ``loss_giou`` (1 / 5 / 2, also the matching costs),
``score_threshold`` (0.5, ``postprocess`` only).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.detection import MeanAveragePrecision
from torchvision import tv_tensors
from torchvision.ops import box_convert, generalized_box_iou_loss

from idrecog.tasks.base import NUMBER, HeadContext, TaskType
from idrecog.tasks.catalogue import TaskSpec
from idrecog.tasks.drawing import Canvas
from idrecog.tasks.matcher import HungarianMatcher
from idrecog.tasks.registry import register_task_type


class DetectionHead(nn.Module):
    """Per object query: class logits (last = no-object) and a box from a 3-layer MLP (DETR).

    task_feats: [B, N, D] -> {"logits": [B, N, C + 1], "boxes": [B, N, 4] cxcywh in [0, 1],
    "image_size": [B, 2] long (H, W)}.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.bbox_embed = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4)
        )

    def forward(self, task_feats: Tensor, ctx: HeadContext) -> dict[str, Tensor]:
        x = self.norm(task_feats)
        size = torch.tensor(tuple(ctx.image_size), dtype=torch.long, device=x.device)
        return {
            "logits": self.class_embed(x),
            "boxes": self.bbox_embed(x).sigmoid(),
            "image_size": size.expand(x.shape[0], 2),
        }


def _scale(image_size: Tensor) -> Tensor:
    """image_size: [..., 2] (H, W) -> [..., 4] (W, H, W, H) float, the divisor of xyxy pixel boxes."""
    h, w = image_size.float().unbind(-1)
    return torch.stack([w, h, w, h], -1)


@register_task_type
class Detection(TaskType):
    type_name = "detection"
    label_format = "list of {box: [x1, y1, x2, y2] in image pixels, label: class name} (may be empty)"
    target_format = "list (length B) of {boxes: FloatTensor [n, 4] xyxy pixels, labels: LongTensor [n]}, None where absent"
    output_format = (
        "logits [B, N, C + 1] (last = no-object), boxes [B, N, 4] cxcywh in [0, 1], image_size [B, 2]"
    )
    primary_metric = "map_50"
    example_fields = {
        "query_text": "Locate the portrait and the MRZ.",
        "classes": ("portrait", "mrz"),
        "options": {"num_queries": 4},
    }

    def __init__(self, spec: TaskSpec, **options: Any) -> None:
        super().__init__(spec, **options)
        self.weights = (
            float(options.get("loss_class", 1.0)),
            float(options.get("loss_bbox", 5.0)),
            float(options.get("loss_giou", 2.0)),
        )
        self.matcher = HungarianMatcher(*self.weights)

    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        if not spec.classes:
            raise ValueError("a detection task needs 'classes'")

    @property
    def num_queries(self) -> int:
        return int(self.options.get("num_queries", 16))

    def check_label(self, value: Any) -> None:
        if not isinstance(value, list):
            raise ValueError(f"must be a list of {{box, label}} objects, got {type(value).__name__}")
        for j, obj in enumerate(value):
            if not isinstance(obj, dict) or set(obj) != {"box", "label"}:
                raise ValueError(f"[{j}] must be an object with exactly the keys 'box' and 'label'")
            if obj["label"] not in (self.spec.classes or ()):
                raise ValueError(
                    f"[{j}].label {obj['label']!r} is not one of {list(self.spec.classes or ())}"
                )
            b = obj["box"]
            if (
                not isinstance(b, list)
                or len(b) != 4
                or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in b
                )
            ):
                raise ValueError(f"[{j}].box must be 4 finite numbers [x1, y1, x2, y2], got {b!r}")
            if not (b[2] > b[0] and b[3] > b[1]):
                raise ValueError(f"[{j}].box {b!r} has non-positive width or height")

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> dict[str, Any]:
        h, w = image_size
        boxes = torch.tensor([o["box"] for o in value], dtype=torch.float32).reshape(-1, 4)
        if len(boxes) and ((boxes[:, :2] < 0).any() or (boxes[:, 2] > w).any() or (boxes[:, 3] > h).any()):
            raise ValueError(f"a box lies outside the image of size {w}x{h} (W x H)")
        labels = torch.tensor([self.spec.class_index(o["label"]) for o in value], dtype=torch.long)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": labels,
        }

    def collate(
        self, targets: list[Any | None], image_size: tuple[int, int]
    ) -> list[dict[str, Tensor] | None]:
        out: list[dict[str, Tensor] | None] = []
        for t in targets:
            if t is None:
                out.append(None)
            else:
                boxes = t["boxes"].as_subclass(Tensor).float().reshape(-1, 4)
                out.append({"boxes": boxes, "labels": t["labels"].long()})
        return out

    def new_label_stats(self) -> Counter[str]:
        return Counter()

    def add_label_stats(self, stats: Counter[str], value: Any, target: Any) -> Counter[str]:
        stats["boxes"] += len(value)
        stats["samples"] += 1
        return stats

    def format_label_stats(self, stats: Counter[str], labelled: int) -> str:
        return f"{stats['boxes'] / stats['samples']:.2f} boxes/sample" if stats["samples"] else "-"

    @classmethod
    def rule_fields(cls, spec: TaskSpec) -> dict[str, str]:
        classes = list(spec.classes or ())
        return {
            "count": NUMBER,
            **{f"count.{c}": NUMBER for c in classes},
            **{f"max_score.{c}": NUMBER for c in classes},
        }

    @classmethod
    def rule_value(cls, spec: TaskSpec, output: Mapping[str, Any], field: str) -> Any:
        boxes = output["boxes"]
        head, _, tail = field.partition(".")
        if field == "count":
            return len(boxes)
        if head == "count":
            return sum(1 for b in boxes if b["label"] == tail)
        return max((float(b["score"]) for b in boxes if b["label"] == tail), default=0.0)

    def draw_target(self, canvas: Canvas, target: Any) -> None:
        boxes = target["boxes"].as_subclass(Tensor).tolist()
        canvas.box_list(
            self.name,
            [(b, int(k), None) for b, k in zip(boxes, target["labels"].tolist(), strict=True)],
            self.spec.classes or (),
        )

    def draw_output(self, canvas: Canvas, output: Mapping[str, Any]) -> None:
        names = list(self.spec.classes or ())
        canvas.box_list(
            self.name,
            [(b["box"], names.index(b["label"]), float(b["score"])) for b in output.get("boxes", [])],
            names,
        )

    # ---------------------------------------------------------------- model side
    def build_head(self, dim: int) -> nn.Module:
        return DetectionHead(dim, self.spec.num_classes)

    def _normalised_targets(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor] | None], idx: list[int]
    ) -> list[dict[str, Tensor]]:
        """Targets of the present samples as normalised cxcywh on the outputs' device (one copy per field)."""
        device = outputs["boxes"].device
        picked = [targets[i] for i in idx]
        if any(t is None for t in picked):
            raise ValueError(f"task {self.name!r}: a present detection sample has no target")
        sizes = [len(t["labels"]) for t in picked]  # type: ignore[index]
        boxes = torch.cat([t["boxes"].float().reshape(-1, 4) for t in picked]).to(device)  # type: ignore[index]
        labels = torch.cat([t["labels"].reshape(-1) for t in picked]).to(device)  # type: ignore[index]
        repeats = torch.tensor(sizes, device=device)
        scale = (
            _scale(outputs["image_size"][idx])
            .to(device)
            .repeat_interleave(repeats, 0, output_size=sum(sizes))
        )
        boxes = box_convert(boxes / scale, "xyxy", "cxcywh")
        return [
            {"labels": lb, "boxes": bx}
            for lb, bx in zip(labels.split(sizes), boxes.split(sizes), strict=True)
        ]

    def loss(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor] | None], present: Tensor
    ) -> Tensor:
        idx = self.present_index(present).tolist()
        if not idx:
            return self.zero_loss(outputs)
        logits = outputs["logits"][idx].float()
        boxes = outputs["boxes"][idx].float()
        tgts = self._normalised_targets(outputs, targets, idx)
        matches = self.matcher(logits, boxes, tgts)

        # gather every matched (sample, query) / target pair at once
        num_classes = self.spec.num_classes
        sample = torch.cat([torch.full_like(q, j) for j, (q, _) in enumerate(matches)])
        query = torch.cat([q for q, _ in matches])
        tgt_labels = torch.cat([t["labels"][ti] for t, (_, ti) in zip(tgts, matches, strict=True)])
        tgt = torch.cat([t["boxes"][ti] for t, (_, ti) in zip(tgts, matches, strict=True)])
        tgt_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
        tgt_classes[sample, query] = tgt_labels
        weight = torch.ones(num_classes + 1, device=logits.device)
        weight[num_classes] = float(self.options.get("eos_coef", 0.1))
        loss_class = F.cross_entropy(logits.flatten(0, 1), tgt_classes.flatten(), weight=weight)

        src = boxes[sample, query]
        # DETR: box terms summed over matched pairs, divided by the number of target boxes
        num_boxes = max(sum(len(t["labels"]) for t in tgts), 1)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = (
            generalized_box_iou_loss(
                box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum"
            )
            / num_boxes
        )
        w_class, w_bbox, w_giou = self.weights
        return w_class * loss_class + w_bbox * loss_bbox + w_giou * loss_giou

    def build_metrics(self) -> MetricCollection:
        return MetricCollection(
            {"map": MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")}
        )

    def _predictions(self, outputs: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """Every query as a scored pixel-xyxy box of its best real class (what COCO mAP expects)."""
        probs = outputs["logits"].detach().float().softmax(-1)[..., :-1]
        scores, labels = probs.max(-1)
        scale = _scale(outputs["image_size"]).to(probs.device)[:, None]  # [B, 1, 4]
        xyxy = box_convert(outputs["boxes"].detach().float(), "cxcywh", "xyxy") * scale
        xyxy = torch.minimum(xyxy.clamp(min=0), scale)
        return [
            {"boxes": b, "scores": s, "labels": lb} for b, s, lb in zip(xyxy, scores, labels, strict=True)
        ]

    def update_metrics(
        self,
        metrics: MetricCollection,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor] | None],
        present: Tensor,
    ) -> None:
        idx = self.present_index(present).tolist()
        if not idx:
            return
        preds = self._predictions(outputs)
        device = outputs["boxes"].device
        tgts = []
        for i in idx:
            t = targets[i]
            assert t is not None, "a present detection sample has no target"
            tgts.append({"boxes": t["boxes"].to(device).float(), "labels": t["labels"].to(device)})
        metrics.update([preds[i] for i in idx], tgts)

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        # MeanAveragePrecision also reports mar_*, size buckets and the class list: keep the headline numbers
        out = super().compute_metrics(metrics)
        return {k: out[k] for k in ("map", "map_50", "map_75") if k in out}

    def postprocess(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        threshold = float(self.options.get("score_threshold", 0.5))
        names = self.spec.classes or ()
        out = []
        for p in self._predictions(outputs):
            keep = (p["scores"] >= threshold).nonzero(as_tuple=True)[0]
            keep = keep[p["scores"][keep].argsort(descending=True)]
            out.append(
                {
                    "boxes": [
                        {
                            "box": [round(float(v), 2) for v in p["boxes"][k]],
                            "label": names[int(p["labels"][k])],
                            "score": round(float(p["scores"][k]), 6),
                        }
                        for k in keep.tolist()
                    ]
                }
            )
        return out

    # ---------------------------------------------------------------- self-description
    @classmethod
    def example_label(
        cls, spec: TaskSpec, root: Path, image_size: tuple[int, int], seed: int = 0
    ) -> list[dict[str, Any]]:
        h, w = image_size
        classes = spec.classes or ()
        objs = []
        for k in range(1 + seed % 3):
            x1, y1 = (0.05 + 0.3 * k) * w, (0.1 + (0.05 * seed) % 0.5) * h
            objs.append(
                {"box": [x1, y1, x1 + 0.25 * w, y1 + 0.4 * h], "label": classes[(k + seed) % len(classes)]}
            )
        return objs

    def output_shapes(self, batch_size: int, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        n, c = self.num_queries, self.spec.num_classes
        return {"logits": (batch_size, n, c + 1), "boxes": (batch_size, n, 4), "image_size": (batch_size, 2)}
