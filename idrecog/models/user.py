"""User information (``user`` in a manifest line) encoded as tensors for tasks that use it.

``attributes`` are categorical (declared nationality, age band...): each gets a vocabulary fitted on the
train split, index 0 meaning missing or unseen. ``behaviour`` values are numbers (standardised with the train
mean/std) or category strings (one-hot over the train vocabulary). Every behaviour dimension has a mask bit:
a missing value is 0 with mask False, never a silent zero.

The fitted state is a JSON-able dict (``state_dict()`` / ``from_state()``) so a model can keep it in its
hyper-parameters and encode users the same way at inference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from idrecog.errors import ConfigError

STATE_VERSION = 1


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _category(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


class UserFeatureEncoder:
    """Fitted vocabularies and statistics for user attributes and behaviour.

    After ``fit``: ``n_attr`` attributes with ``vocab_sizes[i]`` indices each (0 = missing), ``n_behaviour``
    behaviour dimensions (one per numeric key, one per category of a categorical key).
    """

    def __init__(
        self,
        attributes: Mapping[str, list[str]] | None = None,
        numeric: Mapping[str, tuple[float, float]] | None = None,
        categorical: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.attributes: dict[str, list[str]] = {k: list(v) for k, v in (attributes or {}).items()}
        self.numeric: dict[str, tuple[float, float]] = {
            k: (float(m), float(s)) for k, (m, s) in (numeric or {}).items()
        }
        self.categorical: dict[str, list[str]] = {k: list(v) for k, v in (categorical or {}).items()}
        self._build_index()

    def _build_index(self) -> None:
        self._attr_index = {
            k: {v: i + 1 for i, v in enumerate(vocab)} for k, vocab in self.attributes.items()
        }
        # behaviour layout: numeric keys first (sorted), then each categorical key's one-hot block (sorted)
        self.behaviour_names: list[str] = list(self.numeric)
        self._cat_offset: dict[str, int] = {}
        for k, vocab in self.categorical.items():
            self._cat_offset[k] = len(self.behaviour_names)
            self.behaviour_names += [f"{k}={v}" for v in vocab]
        self._cat_index = {k: {v: i for i, v in enumerate(vocab)} for k, vocab in self.categorical.items()}

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, users: Iterable[Mapping[str, Any] | None]) -> UserFeatureEncoder:
        """Fit on the train split's ``user`` objects (``None`` for samples without user info)."""
        attr_vals: dict[str, set[str]] = {}
        beh_nums: dict[str, list[float]] = {}
        beh_cats: dict[str, set[str]] = {}
        for u in users:
            if not u:
                continue
            for k, v in (u.get("attributes") or {}).items():
                vals = attr_vals.setdefault(str(k), set())
                if v is not None:
                    vals.add(_category(v))
            for k, v in (u.get("behaviour") or {}).items():
                k = str(k)
                if v is None:
                    beh_nums.setdefault(k, [])  # a key seen only as null still gets a (masked) slot
                elif _is_number(v):
                    beh_nums.setdefault(k, []).append(float(v))
                else:
                    beh_cats.setdefault(k, set()).add(_category(v))
        # a key seen with both numbers and strings is categorical (its numbers become categories)
        for k in list(beh_nums):
            if k in beh_cats:
                beh_cats[k].update(_category(int(v) if v.is_integer() else v) for v in beh_nums.pop(k))
        numeric = {}
        for k in sorted(beh_nums):
            xs = beh_nums[k]
            mean = sum(xs) / len(xs) if xs else 0.0
            var = sum((x - mean) ** 2 for x in xs) / len(xs) if xs else 0.0
            numeric[k] = (mean, math.sqrt(var) if var > 1e-12 else 1.0)
        return cls(
            attributes={k: sorted(attr_vals[k]) for k in sorted(attr_vals)},
            numeric=numeric,
            categorical={k: sorted(beh_cats[k]) for k in sorted(beh_cats)},
        )

    # ------------------------------------------------------------------ sizes
    @property
    def n_attr(self) -> int:
        return len(self.attributes)

    @property
    def attribute_names(self) -> list[str]:
        return list(self.attributes)

    @property
    def vocab_sizes(self) -> list[int]:
        """Embedding table size per attribute (vocabulary + 1 for index 0 = missing/unseen)."""
        return [len(v) + 1 for v in self.attributes.values()]

    @property
    def n_behaviour(self) -> int:
        return len(self.behaviour_names)

    # ------------------------------------------------------------------ encoding
    def encode(self, user: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """One sample's user info.

        Returns: attributes: long [n_attr] (0 = missing/unseen), behaviour: float [n_beh] (0 where masked),
        behaviour_mask: bool [n_beh], mask: bool [] (the sample has user info).
        """
        attrs = torch.zeros(self.n_attr, dtype=torch.long)
        beh = torch.zeros(self.n_behaviour, dtype=torch.float32)
        beh_mask = torch.zeros(self.n_behaviour, dtype=torch.bool)
        if user:
            a = user.get("attributes") or {}
            for i, (k, index) in enumerate(self._attr_index.items()):
                v = a.get(k)
                if v is not None:
                    attrs[i] = index.get(_category(v), 0)
            b = user.get("behaviour") or {}
            for i, (k, (mean, std)) in enumerate(self.numeric.items()):
                v = b.get(k)
                if _is_number(v) and math.isfinite(float(v)):
                    beh[i] = (float(v) - mean) / std
                    beh_mask[i] = True
            for k, index in self._cat_index.items():
                v = b.get(k)
                if v is None:
                    continue
                if _is_number(v) and float(v).is_integer():
                    v = int(v)
                j = index.get(_category(v))
                if j is not None:
                    # a known category: the whole one-hot block is observed
                    off = self._cat_offset[k]
                    beh[off + j] = 1.0
                    beh_mask[off : off + len(index)] = True
        return {
            "attributes": attrs,
            "behaviour": beh,
            "behaviour_mask": beh_mask,
            "mask": torch.tensor(bool(user)),
        }

    def empty(self) -> dict[str, Tensor]:
        """The encoding of a sample without user info (everything masked)."""
        return self.encode(None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A JSON-able dict (lists, strings, floats)."""
        return {
            "version": STATE_VERSION,
            "attributes": {k: list(v) for k, v in self.attributes.items()},
            "numeric": {k: [m, s] for k, (m, s) in self.numeric.items()},
            "categorical": {k: list(v) for k, v in self.categorical.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> UserFeatureEncoder:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"user encoder state: expected a dict with version {STATE_VERSION}, got {state!r:.80}"
            )
        try:
            return cls(
                attributes=state.get("attributes") or {},
                numeric={k: (v[0], v[1]) for k, v in (state.get("numeric") or {}).items()},
                categorical=state.get("categorical") or {},
            )
        except (TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"user encoder state is malformed: {e}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserFeatureEncoder) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return f"UserFeatureEncoder(n_attr={self.n_attr}, vocab_sizes={self.vocab_sizes}, n_behaviour={self.n_behaviour})"
