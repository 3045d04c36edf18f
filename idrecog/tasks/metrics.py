"""Presentation-attack error rates (ISO/IEC 30107-3) as torchmetrics, for attack detectors.

Inputs, as ``BinaryStatScores``: ``preds`` the attack score in [0, 1] (1 - P(bona fide)) and ``target`` 1 for an
attack presentation, 0 for a bona fide one; a presentation is classified an attack when its score is at least the
operating ``threshold``.

* APCER (attack presentation classification error rate): the share of attack presentations classified bona fide.
* BPCER (bona fide presentation classification error rate): the share of bona fide presentations classified
  attacks.

With no presentation of the kind a rate is about, it is 0 (nothing was misclassified).
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.classification import BinaryStatScores

__all__ = ["APCER", "BPCER"]


class APCER(BinaryStatScores):
    """Attack presentations classified as bona fide, over all attack presentations."""

    higher_is_better = False

    def compute(self) -> Tensor:
        tp, _, _, fn, _ = super().compute().unbind(-1)
        return fn.float() / (tp + fn).clamp(min=1).float()


class BPCER(BinaryStatScores):
    """Bona fide presentations classified as attacks, over all bona fide presentations."""

    higher_is_better = False

    def compute(self) -> Tensor:
        _, fp, tn, _, _ = super().compute().unbind(-1)
        return fp.float() / (fp + tn).clamp(min=1).float()
