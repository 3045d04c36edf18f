"""``MultimodalQueries``: the converter that makes each task's query tokens from its text and the sample's
associated information.

For task t and sample b, a small transformer reads::

    [slot tokens of t (Q_t, learned)] + [text tokens of t's query_text (frozen text encoder, projected)]
      + [frame tokens: flash + angle frames, pooled patch tokens]   only if t is `frames: multi` and `uses` them
      + [tilt-change token: what changes across the angle frames]  only if t `uses` angles (``frame_change``)
      + [user tokens: one per attribute, one per behaviour value]    only if t `uses: [user]`

and its outputs at the slot positions, projected to the decoder width, are the sample's queries [B, Q_t, dim].
Missing information (a sample without frames or user info, an unknown attribute, a missing behaviour value) is
removed with the attention key padding mask, never fed as zeros.

* ``image_mode``: frames are encoded by the model's own encoder without gradient (``shared_frozen``, default),
  with gradient (``shared``), or by a separate light patch embedding (``separate``); the patch tokens are pooled
  to a ``frame_pool`` grid. Only the frames present in the batch are encoded.
* ``frame_change`` (default on): each present angle frame's pixel deviation from the mean of the sample's angle
  frames, embedded by a bias-free patch convolution (a static region gives exactly zero), GELU, max-pooled per
  ``frame_pool`` cell and over the series (one ``change`` token per sample). The flash frame is not in the mean.
* ``combine``: ``add`` (default), the converter's output at a task's slots is its queries; ``film``, a learned
  per-token embedding scaled by ``1 +`` that output, whose last projection starts at zero.
* ``static_queries``: ``text`` (default), tasks that read no associated information take ``TextQueries``'
  ``film`` path and the converter runs only for tasks that read frames or user info; ``converter``, every task's
  queries come out of the converter.

Why these defaults: docs/task-queries.md; the measurements: docs/reports/task-queries.md. User attributes and
behaviour come in the encodings of :class:`idrecog.models.user.UserFeatureEncoder`; the vocabulary sizes come
from its fitted state (``user_spec``), which ``UnifiedModule`` keeps in its ``user_features`` hyper-parameter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idrecog.errors import ConfigError
from idrecog.models.queries import (
    TaskQueryProvider,
    check_combine,
    module_key,
    register_query_provider,
    zero_,
)
from idrecog.models.user import UserFeatureEncoder
from idrecog.tasks.catalogue import USER_PARTS, TaskCatalogue
from idrecog.text import encode_texts, load_text_encoder, mean_pool

__all__ = ["IMAGE_MODES", "KINDS", "STATIC_PATHS", "MultimodalQueries"]

IMAGE_MODES = ("shared", "shared_frozen", "separate")
#: how tasks that read no associated information get their queries (``static_queries``)
STATIC_PATHS = ("converter", "text")
#: token kinds of the converter's input, in ``inputs_for(...)["kinds"]``
KINDS = ("slot", "text", "frame", "user", "change")
SLOT, TEXT, FRAME, USER, CHANGE = range(5)
MAX_FRAMES = 8  # flash + up to 7 angle frames get their own frame-slot embedding


@register_query_provider("multimodal")
class MultimodalQueries(TaskQueryProvider):
    """The multimodal converter (see the module docstring).

    Args:
        model_dir: local transformers folder of the text encoder; None: the packaged all-MiniLM-L6-v2.
        width: the converter's token width.
        depth: converter layers.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        image_mode: ``shared_frozen`` (default) | ``shared`` | ``separate`` (see the module docstring).
        frame_pool: (h, w) grid the frame patch tokens are average-pooled to.
        patch_size: patch size of the ``separate`` patch embedding and of the tilt-change embedding.
        frame_change: tilt-change features for tasks that use angle frames (see the module docstring).
        max_length: token limit of a query text.
        std: init std of the learned tokens.
        combine: ``add`` (default: the converter's output is the query) or ``film`` (learned per-token
            embeddings scaled by 1 + the converter's output); see the module docstring.
        static_queries: ``text`` (default) or ``converter``: how tasks that read no associated information get
            their queries (see the module docstring).
        user_parts: the parts of the user information the converter reads (``attributes``, ``behaviour``); the
            others are masked out, as missing values are (to measure what one part brings).
    """

    consumes_frames = True
    consumes_user = True

    def __init__(
        self,
        model_dir: str | None = None,
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        image_mode: str = "shared_frozen",
        frame_pool: tuple[int, int] = (5, 8),
        patch_size: int = 16,
        max_length: int = 64,
        std: float = 0.02,
        frame_change: bool = True,
        combine: str = "add",
        static_queries: str = "text",
        user_parts: tuple[str, ...] = USER_PARTS,
    ) -> None:
        super().__init__()
        if not set(user_parts) <= set(USER_PARTS):
            raise ConfigError(
                f"queries.user_parts must be drawn from {list(USER_PARTS)}, got {list(user_parts)!r}"
            )
        if image_mode not in IMAGE_MODES:
            raise ConfigError(f"queries.image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if static_queries not in STATIC_PATHS:
            raise ConfigError(f"queries.static_queries must be one of {STATIC_PATHS}, got {static_queries!r}")
        self.init_args = {
            "model_dir": model_dir,
            "width": width,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "image_mode": image_mode,
            "frame_pool": [int(frame_pool[0]), int(frame_pool[1])],
            "patch_size": patch_size,
            "max_length": max_length,
            "std": std,
            "frame_change": bool(frame_change),
            "combine": check_combine(combine),
            "static_queries": static_queries,
            "user_parts": list(user_parts),
        }
        self.model_dir, self.width, self.image_mode = model_dir, width, image_mode
        self.frame_pool = (int(frame_pool[0]), int(frame_pool[1]))
        self.patch_size, self.max_length, self.std = patch_size, max_length, std
        self.depth, self.num_heads, self.mlp_ratio = depth, num_heads, mlp_ratio
        self.frame_change = bool(frame_change)
        self.combine, self.static_queries = combine, static_queries
        #: which parts of the user information the converter reads (an ablation drops one: masked, not zeroed)
        self.user_parts = frozenset(user_parts)
        self.tasks: list[str] = []
        self.frame_kinds: dict[
            str, tuple[bool, bool]
        ] = {}  # task -> (uses flash, uses angles), multi-frame only
        self.user_tasks: set[str] = set()
        #: tasks that bypass the converter (``static_queries="text"``), set in ``build``
        self.static_tasks: set[str] = set()
        self.user_spec: dict[str, Any] | None = None
        self._shared: tuple[nn.Module, ...] = ()  # the model's encoder, not registered (no duplicate weights)
        #: per task, the last converter input: {"kinds": long [S], "valid": bool [B or 1, S]} (for tests, debugging)
        self.last_inputs: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ build
    def build(
        self,
        catalogue: TaskCatalogue,
        query_counts: dict[str, int],
        dim: int,
        encoder: nn.Module | None = None,
        user_spec: dict[str, Any] | None = None,
    ) -> None:
        self.query_counts, self.dim = dict(query_counts), dim
        self.tasks = list(catalogue.names)
        w = self.width
        # text: token states of every query text, computed once by the frozen encoder, not in checkpoints
        tok, enc = load_text_encoder(self.model_dir)
        with torch.no_grad():
            states, mask = encode_texts(
                tok, enc, [catalogue[t].query_text for t in self.tasks], self.max_length
            )
        self.register_buffer("text_states", states.detach(), persistent=False)  # [T, S, H]
        self.register_buffer("text_mask", mask, persistent=False)  # [T, S]
        hidden = int(states.shape[-1])
        del tok, enc
        self.text_proj = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, w))
        self.kind_embed = nn.Parameter(torch.randn(len(KINDS), w) * self.std)
        # frames: only tasks that are multi-frame AND use flash/angles
        self.frame_kinds = {
            s.name: ("flash" in s.uses, "angles" in s.uses) for s in catalogue if s.uses_frames
        }
        self.user_tasks = {s.name for s in catalogue if s.uses_user}
        self.static_tasks = set()
        if self.static_queries == "text":
            reads = set(self.frame_kinds) | self.user_tasks
            self.static_tasks = {t for t in self.tasks if t not in reads}
        self.slots = nn.ParameterDict()
        for t in self.tasks:
            n = int(query_counts[t])
            if n < 1:
                raise ConfigError(f"task {t!r} must own at least one query token, got {n}")
            if t not in self.static_tasks:
                self.slots[module_key(t)] = nn.Parameter(torch.randn(n, w) * self.std)
        if self.static_tasks:  # TextQueries' film path: offset[k] * (1 + proj(pooled text)), proj from zero
            self.register_buffer("text_pooled", mean_pool(states, mask).detach(), persistent=False)  # [T, H]
            self.static_proj = nn.Sequential(nn.LayerNorm(hidden), zero_(nn.Linear(hidden, dim)))
            self.static_base = nn.ParameterDict(
                {
                    module_key(t): nn.Parameter(torch.randn(int(query_counts[t]), dim) * self.std)
                    for t in self.tasks
                    if t in self.static_tasks
                }
            )
        if self.frame_kinds:
            if self.image_mode == "separate":
                self.patch_embed = nn.Conv2d(3, w, self.patch_size, self.patch_size)
                frame_in = w
            else:
                if encoder is None:
                    raise ConfigError(
                        f"queries.image_mode={self.image_mode!r} encodes frames with the model's encoder, but "
                        "build() got none; use image_mode: separate for a standalone provider"
                    )
                self._shared = (encoder,)
                frame_in = int(encoder.embed_dim)
            self.frame_proj = nn.Sequential(nn.LayerNorm(frame_in), nn.Linear(frame_in, w))
            n_pos = self.frame_pool[0] * self.frame_pool[1]
            self.frame_pos = nn.Parameter(torch.randn(n_pos, w) * self.std)
            self.frame_slot = nn.Parameter(torch.randn(MAX_FRAMES, w) * self.std)
            if self.frame_change and any(angles for _, angles in self.frame_kinds.values()):
                self.change_embed = nn.Conv2d(3, w, self.patch_size, self.patch_size, bias=False)
                self.change_cell = nn.Linear(w, w)  # per cell, added to the angle frame's tokens
                self.change_token = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w))
        if self.user_tasks and user_spec is not None:
            self.set_user_spec(user_spec)
        layer = nn.TransformerEncoderLayer(
            w,
            self.num_heads,
            int(w * self.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.converter = nn.TransformerEncoder(layer, self.depth, enable_nested_tensor=False)
        self.out_proj = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, dim))
        if self.combine == "film":
            zero_(self.out_proj[-1])
            self.base = nn.ParameterDict(
                {
                    module_key(t): nn.Parameter(torch.randn(int(query_counts[t]), dim) * self.std)
                    for t in self.tasks
                }
            )

    def set_user_spec(self, user_spec: dict[str, Any]) -> None:
        """Create the user-feature embeddings from a ``UserFeatureEncoder`` state (vocabularies, behaviour size)."""
        enc = UserFeatureEncoder.from_state(user_spec)
        self.user_spec = enc.state_dict()
        ref = self.kind_embed
        sizes = enc.vocab_sizes
        offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0) if sizes else torch.zeros(0)
        self.register_buffer("attr_offsets", offsets.long().to(ref.device), persistent=False)
        w = self.width
        self.attr_embed = nn.Embedding(max(1, sum(sizes)), w).to(ref.device)
        nn.init.normal_(self.attr_embed.weight, std=self.std)
        self.attr_id = nn.Parameter(torch.randn(max(1, enc.n_attr), w, device=ref.device) * self.std)
        self.beh_weight = nn.Parameter(torch.randn(max(1, enc.n_behaviour), w, device=ref.device) * self.std)
        self.beh_bias = nn.Parameter(torch.randn(max(1, enc.n_behaviour), w, device=ref.device) * self.std)
        self.n_attr, self.n_behaviour = enc.n_attr, enc.n_behaviour

    @property
    def needs_user_spec(self) -> bool:
        """Some task uses user info but the vocabularies are not known yet (see ``set_user_spec``)."""
        return bool(self.user_tasks) and self.user_spec is None

    # ------------------------------------------------------------------ associated information
    @property
    def has_change(self) -> bool:
        return hasattr(self, "change_embed")

    def encode_frames(self, assoc: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """assoc: {"flash": [B, 3, H, W], "angles": [B, A, 3, H, W], "mask": bool [B, 1 + A]} ->
        (tokens [B, 1 + A, P, width], valid bool [B, 1 + A, P]); P = frame_pool cells. Absent frames are not
        encoded and are invalid. The tilt-change cells are not included (``encode_change``)."""
        frames = torch.cat([assoc["flash"].unsqueeze(1), assoc["angles"]], dim=1)  # [B, F, 3, H, W]
        present = assoc["mask"].to(frames.device).bool()  # [B, F]
        b, f = present.shape
        p = self.frame_pool[0] * self.frame_pool[1]
        out = frames.new_zeros(b, f, p, self.width)
        if present.any():
            x = frames[present]  # [N, 3, H, W]
            if self.image_mode == "separate":
                grid = self.patch_embed(x)  # [N, w, H/p, W/p]
            else:
                enc = self._shared[0]
                with torch.set_grad_enabled(self.image_mode == "shared" and torch.is_grad_enabled()):
                    tokens = enc(x)  # [N, L, E]
                gh, gw = enc.grid_size
                grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
            pooled = F.adaptive_avg_pool2d(grid, self.frame_pool).flatten(2).transpose(1, 2)  # [N, P, C]
            slot_ids = torch.arange(f, device=frames.device).clamp_max(MAX_FRAMES - 1)
            slot = self.frame_slot[slot_ids].unsqueeze(0).expand(b, -1, -1)[present]  # [N, w]
            tok = self.frame_proj(pooled) + self.frame_pos + slot.unsqueeze(1) + self.kind_embed[FRAME]
            out = out.index_put((present,), tok.to(out.dtype))
        return out, present.unsqueeze(-1).expand(b, f, p)

    def encode_change(self, assoc: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Tilt change of the angle frames (see the module docstring) -> (cells [B, A, P, width] to add to the
        angle frame tokens, token [B, 1, width], valid bool [B, 1]). Zero cells and an invalid token for samples
        with fewer than two present angle frames; absent frames never enter the mean."""
        angles = assoc["angles"]  # [B, A, 3, H, W]
        present = assoc["mask"].to(angles.device).bool()[:, 1:]  # [B, A]
        b, a = present.shape
        p = self.frame_pool[0] * self.frame_pool[1]
        ok = present.sum(1) >= 2  # [B]
        cells = angles.new_zeros(b, a, p, self.width)
        token = angles.new_zeros(b, 1, self.width)
        if ok.any():
            m = present.to(angles.dtype)[:, :, None, None, None]
            mean = (angles * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
            sel = present & ok[:, None]  # [B, A]
            c = F.gelu(self.change_embed((angles - mean)[sel]))  # [M, w, H/p, W/p]
            pooled = F.adaptive_max_pool2d(c, self.frame_pool).flatten(2).transpose(1, 2)  # [M, P, w]
            cells = cells.index_put((sel,), self.change_cell(pooled).to(cells.dtype))
            # the strongest change anywhere in the sample's series: max over its frames and patches
            per_frame = c.new_full((b, a, self.width), torch.finfo(c.dtype).min)
            per_frame = per_frame.index_put((sel,), c.amax(dim=(2, 3)))
            strongest = torch.where(ok[:, None], per_frame.amax(1), torch.zeros_like(per_frame[:, 0]))
            token = (self.change_token(strongest) + self.kind_embed[CHANGE]).unsqueeze(1).to(token.dtype)
        return cells, token, ok.unsqueeze(1)

    def encode_user(self, user: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """user (batch contract) -> (tokens [B, n_attr + n_beh, width], valid bool [B, n_attr + n_beh]).
        An attribute at index 0 (missing/unseen), a masked behaviour value, or a sample without user info is
        invalid."""
        if self.user_spec is None:
            raise ConfigError(
                "a task uses user info but the converter has no user-feature vocabulary: set the model's "
                "user_features (UnifiedModule takes it from the DataModule in setup) or call set_user_spec"
            )
        attrs = user["attributes"].long()  # [B, n_attr]
        has = user["mask"].bool()  # [B]
        b = attrs.shape[0]
        a_tok = self.attr_embed(attrs + self.attr_offsets) + self.attr_id[: self.n_attr]  # [B, n_attr, w]
        a_valid = (attrs > 0) & has.unsqueeze(1) & ("attributes" in self.user_parts)
        beh = user["behaviour"].float()  # [B, n_beh]
        w_ = self.beh_weight[: self.n_behaviour]
        b_tok = beh.unsqueeze(-1) * w_ + self.beh_bias[: self.n_behaviour]  # [B, n_beh, w]
        b_valid = user["behaviour_mask"].bool() & has.unsqueeze(1) & ("behaviour" in self.user_parts)
        tok = torch.cat([a_tok.reshape(b, self.n_attr, -1), b_tok], dim=1) + self.kind_embed[USER]
        return tok, torch.cat([a_valid, b_valid], dim=1)

    # ------------------------------------------------------------------ converter
    def inputs_for(
        self, task: str, batch_size: int, batch: dict[str, Any] | None = None, cache: dict | None = None
    ) -> dict[str, Tensor]:
        """The converter's input for one task: {"tokens": [B', S, width], "valid": bool [B', S] (False = masked
        out), "kinds": long [S] (indices into ``KINDS``)}; B' = 1 when nothing sample-dependent enters."""
        cache = {} if cache is None else cache
        batch = batch or {}
        if task in self.static_tasks:
            raise ValueError(
                f"task {task!r} bypasses the converter (static_queries='text'): it has no converter input"
            )
        i = self.tasks.index(task)
        slots = self.slots[module_key(task)] + self.kind_embed[SLOT]  # [Q, w]
        tmask = self.text_mask[i]
        text = self.text_proj(self.text_states[i][tmask]) + self.kind_embed[TEXT]  # [S_t, w]
        static = torch.cat([slots, text], dim=0)
        kinds = [torch.full((slots.shape[0],), SLOT), torch.full((text.shape[0],), TEXT)]
        parts: list[tuple[Tensor, Tensor]] = []
        if task in self.frame_kinds and batch.get("assoc") is not None:
            if "frames" not in cache:
                cache["frames"] = self.encode_frames(batch["assoc"])
            ftok, fvalid = cache["frames"]  # [B, F, P, w], [B, F, P]
            flash, angles = self.frame_kinds[task]
            use = torch.zeros(ftok.shape[1], dtype=torch.bool, device=ftok.device)
            use[0] = flash
            use[1:] = angles
            change: tuple[Tensor, Tensor] | None = None  # the change token [B, 1, w] and its validity [B, 1]
            if angles and self.has_change:
                if "change" not in cache:
                    cache["change"] = self.encode_change(batch["assoc"])
                cells, ctok, cvalid = cache["change"]
                change = (ctok, cvalid)
                ftok = torch.cat([ftok[:, :1], ftok[:, 1:] + cells.to(ftok.dtype)], dim=1)
            ftok, fvalid = ftok[:, use].flatten(1, 2), fvalid[:, use].flatten(1, 2)
            parts.append((ftok, fvalid))
            kinds.append(torch.full((ftok.shape[1],), FRAME))
            if change is not None:  # after the frame tokens
                parts.append(change)
                kinds.append(torch.full((1,), CHANGE))
        if task in self.user_tasks and batch.get("user") is not None:
            if "user" not in cache:
                cache["user"] = self.encode_user(batch["user"])
            parts.append(cache["user"])
            kinds.append(torch.full((cache["user"][0].shape[1],), USER))
        bsz = batch_size if parts else 1
        tokens = [static.unsqueeze(0).expand(bsz, -1, -1)] + [p[0] for p in parts]
        valid = [torch.ones(bsz, static.shape[0], dtype=torch.bool, device=static.device)]
        valid += [p[1] for p in parts]
        return {
            "tokens": torch.cat([t.to(static.dtype) for t in tokens], dim=1),
            "valid": torch.cat(valid, dim=1),
            "kinds": torch.cat(kinds).to(static.device),
        }

    def forward(self, tasks: list[str], batch_size: int, batch: dict[str, Any] | None = None) -> Tensor:
        """-> [B, sum(Q_t), dim]: each sample's query tokens for the tasks, in order."""
        cache: dict[str, Any] = {}
        out = []
        # one projection of every pooled text per forward, as TextQueries does
        film = self.static_proj(self.text_pooled) if self.static_tasks else None  # [T, dim]
        for t in tasks:
            if film is not None and t in self.static_tasks:
                q = self.static_base[module_key(t)] * (1.0 + film[self.tasks.index(t)])
                out.append(q.unsqueeze(0).expand(batch_size, -1, -1))
                continue
            inp = self.inputs_for(t, batch_size, batch, cache)
            self.last_inputs[t] = {"kinds": inp["kinds"], "valid": inp["valid"].detach()}
            h = self.converter(inp["tokens"], src_key_padding_mask=~inp["valid"])
            q = self.out_proj(h[:, : self.query_counts[t]])  # [B', Q_t, dim]
            if self.combine == "film":
                q = self.base[module_key(t)] * (1.0 + q)
            out.append(q.expand(batch_size, -1, -1))
        return torch.cat(out, dim=1)

    def no_weight_decay(self) -> set[str]:
        names = {"kind_embed", "frame_pos", "frame_slot", "attr_id", "beh_bias"}
        names |= {f"base.{k}" for k in getattr(self, "base", {})}
        names |= {f"static_base.{k}" for k in getattr(self, "static_base", {})}
        return names | {f"slots.{k}" for k in self.slots}
