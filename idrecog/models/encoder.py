"""The image encoder: a timm Vision Transformer, shared by MAE pretraining and the unified model.

Both modules hold it under the attribute ``encoder`` and keep the timm model itself under ``encoder.vit``, so a
state dict passes between them, and to plain timm, by stripping a prefix: no conversion.
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.nn import functional as F

from idrecog.errors import ConfigError

log = logging.getLogger(__name__)

# prefixes under which the timm weights sit in our checkpoints (unified, MAE, task classifier) and in others'
_PREFIXES = ("model.encoder.vit.", "encoder.vit.", "backbone.vit.", "vit.", "module.", "encoder.", "model.")


# the constructor arguments that say where the starting weights come from; a checkpoint holds the weights itself,
# so the config it stores to rebuild the encoder clears them (see ``architecture_config``)
WEIGHT_SOURCES: dict[str, Any] = {"init_from": None, "pretrained": False, "pretrained_file": None}


def _check_name(name: str) -> None:
    """``name`` is a timm architecture, optionally with a pretrained tag (``vit_base_patch16_224.mae``)."""
    arch, _, tag = name.partition(".")
    known = timm.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, [m for m in known if "vit" in m or "deit" in m] or known, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"encoder name {name!r} is not a timm model{hint}")
    if tag and name not in timm.list_pretrained(arch):
        tags = [m.partition(".")[2] for m in timm.list_pretrained(arch)]
        raise ConfigError(
            f"encoder name {name!r}: timm has no pretrained tag {tag!r} for {arch}; its tags: {tags or 'none'}"
        )


def architecture_config(init_args: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``ViTEncoder`` constructor arguments with the weight sources cleared (``init_from``,
    ``pretrained``, ``pretrained_file``): what a checkpoint stores to rebuild the encoder without re-reading the
    file or the hub it started from."""
    return {**init_args, **WEIGHT_SOURCES}


class ViTEncoder(nn.Module):
    """A timm ViT that returns patch tokens.

    Args:
        name: any timm ViT (``timm.list_models('vit_*')``), e.g. ``vit_tiny_patch16_224``, ``vit_base_patch16_224``;
            hybrids (a CNN stem before the patches) too, e.g. ``vit_tiny_r_s16_p8_224`` with
            ``model_kwargs: {patch_size: 4}`` for the same 16-pixel token stride (``patch_size`` counts the stem).
            A pretrained tag may follow (``timm.list_pretrained('vit_*')``): ``vit_base_patch16_224.mae``,
            ``vit_tiny_patch16_224.augreg_in21k``; it names the weights ``pretrained`` loads.
        img_size: input (H, W); non-square is fine; each must be a multiple of the patch size.
        depth / embed_dim / num_heads: optional overrides of the named architecture (for small CPU models).
        drop_path_rate: stochastic depth.
        init_from: a weight file to start from: a timm-format state dict (``.safetensors``, ``.pth``), an
            ``idrecog pretrain`` or ``idrecog fit`` checkpoint (``.ckpt``). Position embeddings are resampled
            when the patch grid differs; missing and unexpected keys are reported.
        pretrained: start from timm's pretrained weights for ``name`` (its tag, else timm's default tag), loaded
            by ``timm.create_model(pretrained=True)``: from the Hugging Face hub, or its local cache when offline
            (``HF_HUB_OFFLINE=1``). The position embeddings are resampled to this encoder's grid (e.g. 14 x 14 of a
            224 x 224 model to 10 x 16 at 160 x 256).
        pretrained_file: a local copy of those weights (timm format: ``.safetensors``, ``.bin``, ``.pth``), read
            through timm's ``pretrained_cfg_overlay=dict(file=...)``, no network; implies ``pretrained``. A file
            written by ``idrecog export-encoder`` carries its input size, so its non-square grid resamples too.
        model_kwargs: further keyword arguments for ``timm.create_model``.
    """

    def __init__(
        self,
        name: str = "vit_tiny_patch16_224",
        img_size: tuple[int, int] = (192, 304),
        depth: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        drop_path_rate: float = 0.0,
        init_from: str | None = None,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_name(name)
        pretrained = bool(pretrained or pretrained_file)
        # the constructor arguments, so that a model holding this encoder can store and rebuild it
        self.init_args: dict[str, Any] = {
            "name": name,
            "img_size": [int(img_size[0]), int(img_size[1])],
            "depth": depth,
            "embed_dim": embed_dim,
            "num_heads": num_heads,
            "drop_path_rate": drop_path_rate,
            "init_from": init_from,
            "pretrained": pretrained,
            "pretrained_file": pretrained_file,
            "model_kwargs": model_kwargs,
        }
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        for k, v in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)):
            if v is not None:
                kwargs[k] = v
        self.name = name
        self.img_size = (int(img_size[0]), int(img_size[1]))
        if pretrained:
            kwargs.update(_pretrained_kwargs(pretrained_file, architecture_changed=bool(kwargs)))
        try:
            with _TimmLoadMessages() as messages:
                self.vit = timm.create_model(
                    name,
                    pretrained=pretrained,
                    img_size=self.img_size,
                    num_classes=0,
                    global_pool="",
                    drop_path_rate=drop_path_rate,
                    **kwargs,
                )
        except (OSError, ConnectionError) as e:  # the hub (huggingface_hub, torch.hub), or an unreadable file
            if pretrained_file:
                raise ConfigError(f"encoder.pretrained_file {pretrained_file}: cannot read it: {e}") from None
            raise ConfigError(
                f"encoder.pretrained: cannot get the weights of {name!r} from the Hugging Face hub or its cache "
                f"({type(e).__name__}; offline?); give a local copy with encoder.pretrained_file"
            ) from None
        except RuntimeError as e:  # no weights for the name, or weights that do not fit the architecture
            if not pretrained:
                raise
            where = f"encoder.pretrained_file {pretrained_file}" if pretrained_file else "encoder.pretrained"
            raise ConfigError(
                f"{where}: timm could not load the weights into {name!r}: {_first_line(e)}"
            ) from None
        except AssertionError as e:  # timm asserts sizes (e.g. a hybrid's feature map vs its patch size)
            raise ConfigError(
                f"encoder {name!r} cannot be built at img_size {list(self.img_size)}: each side must be a "
                f"multiple of the token stride (patch size, times the CNN stem's stride for a hybrid ViT)"
            ) from e
        for attr in ("patch_embed", "pos_embed", "blocks", "norm"):
            if not hasattr(self.vit, attr):
                raise ConfigError(f"encoder {name!r} is not a plain Vision Transformer (no {attr!r})")
        p = self.patch_size
        if self.img_size[0] % p or self.img_size[1] % p:
            raise ConfigError(
                f"img_size {self.img_size} must be a multiple of the patch size {p} in both H and W"
            )
        if pretrained:
            source = pretrained_file or f"the hub ({self.vit.pretrained_cfg.get('hf_hub_id') or 'timm url'})"
            print(
                f"[idrecog] encoder {name}: pretrained weights from {source}"
                + (f"; timm: {' '.join(messages)}" if messages else ", every tensor loaded")
            )
        if init_from:
            self.load_pretrained(init_from)

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def patch_size(self) -> int:
        """Input pixels per token side. A hybrid ViT (timm ``HybridEmbed``: a CNN stem, then patches of its
        feature map, e.g. ``vit_tiny_r_s16_p8_224`` with ``patch_size: 4``) counts its stem's stride too."""
        pe = self.vit.patch_embed
        ps = pe.patch_size
        p = int(ps[0] if isinstance(ps, tuple | list) else ps)
        ratio = getattr(pe, "feature_ratio", None)
        return p * int(ratio[0]) if ratio is not None else p

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.vit.patch_embed.grid_size
        return int(g[0]), int(g[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    # ------------------------------------------------------------------ forward
    def embed(self, imgs: Tensor) -> Tensor:
        """imgs: [N, 3, H, W] -> patch embeddings with position embeddings added: [N, L, D] (no prefix tokens)."""
        return self.vit.patch_embed(imgs) + self.patch_pos_embed()

    def patch_pos_embed(self) -> Tensor:
        """The position embeddings of the patch tokens (prefix tokens' dropped): [1, L, D]."""
        pos = self.vit.pos_embed
        return pos if self.vit.no_embed_class else pos[:, self.num_prefix_tokens :]

    def prefix_tokens(self, n: int) -> Tensor:
        """The class (and register) tokens with their position embeddings: [N, P, D]."""
        toks = []
        if getattr(self.vit, "cls_token", None) is not None:
            cls = self.vit.cls_token
            if not self.vit.no_embed_class:
                cls = cls + self.vit.pos_embed[:, :1]
            toks.append(cls.expand(n, -1, -1))
        if getattr(self.vit, "reg_token", None) is not None:
            toks.append(self.vit.reg_token.expand(n, -1, -1))
        return torch.cat(toks, dim=1) if toks else self.vit.pos_embed.new_zeros(n, 0, self.embed_dim)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Run the transformer on already embedded tokens x: [N, P + K, D] (prefix first) -> normed [N, P + K, D]."""
        x = self.vit.norm_pre(x)
        x = self.vit.blocks(x)
        return self.vit.norm(x)

    def _linear_patch_embed(self) -> bool:
        """True when the patch embedding is a plain stride-p, kernel-p convolution, i.e. a linear map per patch."""
        pe = self.vit.patch_embed
        proj = getattr(pe, "proj", None)
        p = self.patch_size
        return (
            isinstance(proj, nn.Conv2d)
            and tuple(proj.kernel_size) == (p, p)
            and tuple(proj.stride) == (p, p)
            and tuple(proj.padding) == (0, 0)
            and proj.groups == 1
            and not getattr(pe, "dynamic_img_pad", False)
            and getattr(pe, "flatten", False)
        )

    def embed_visible(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """Patch embeddings (with position embeddings) of the kept patches only.

        imgs: [N, 3, H, W]; ids_keep: [N, K] row-major patch indices -> [N, K, D]. Equal to gathering ``embed``'s
        output, but the projection runs on the K kept patches instead of all L: the convolution is a linear map
        per patch, so its weight is applied to the gathered pixels (4x less patch-embedding work at mask 0.75).
        """
        if not self._linear_patch_embed():
            x = self.embed(imgs)
            return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        pe = self.vit.patch_embed
        n, c, h, w = imgs.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        if (gh * p, gw * p) != (h, w) or (gh, gw) != self.grid_size:
            raise ValueError(
                f"input {h} x {w} does not match the encoder's {self.grid_size} grid of {p}-pixel patches"
            )
        # [N, C, gh, p, gw, p] indexed at (row, col) of each kept patch -> [N, K, C, p, p] (only kept pixels copied)
        rows, cols = ids_keep // gw, ids_keep % gw
        batch = torch.arange(n, device=imgs.device).unsqueeze(1)
        patches = imgs.reshape(n, c, gh, p, gw, p)[batch, :, rows, :, cols, :]
        x = F.linear(
            patches.reshape(n, ids_keep.shape[1], c * p * p), pe.proj.weight.flatten(1), pe.proj.bias
        )
        x = pe.norm(x)
        pos = self.patch_pos_embed().expand(n, -1, -1)
        return x + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))

    def forward_visible(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode only the kept patches (MAE). imgs: [N, 3, H, W]; ids_keep: [N, K] -> [N, P + K, D]."""
        x = self.embed_visible(imgs, ids_keep)
        x = torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1)
        return self.forward_tokens(x)

    def forward(self, imgs: Tensor) -> Tensor:
        """imgs: [N, 3, H, W] -> patch tokens [N, L, D], L = (H / p) * (W / p), row-major over the patch grid."""
        x = self.embed(imgs)
        x = torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1)
        return self.forward_tokens(x)[:, self.num_prefix_tokens :]

    # ------------------------------------------------------------------ weights
    def timm_state_dict(self) -> dict[str, Tensor]:
        """Weights in timm's own key format (what ``timm.create_model(name, pretrained_cfg_overlay=...)`` loads)."""
        return {k: v.detach().clone() for k, v in self.vit.state_dict().items()}

    def load_pretrained(
        self, path: str | Path, grid_size: tuple[int, int] | None = None
    ) -> tuple[list[str], list[str]]:
        """Load weights from ``path`` (see class doc). Returns (missing, unexpected) keys, also logged."""
        from idrecog.utils.checkpoint import load_weights_file

        state, meta = load_weights_file(path)
        state = extract_timm_state(state)
        if not state:
            raise ConfigError(
                f"{path}: no encoder weights found (expected timm ViT keys such as 'blocks.0.attn.qkv.weight')"
            )
        old_grid = grid_size or _grid_from_meta(meta)
        if "pos_embed" in state:
            state["pos_embed"] = self._resample_pos_embed(state["pos_embed"], old_grid, path)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        # heads are not part of the encoder
        unexpected = [k for k in unexpected if not k.startswith(("head.", "fc_norm."))]
        missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
        print(
            f"[idrecog] encoder weights from {path}: {len(state)} tensors, missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
        return list(missing), list(unexpected)

    def _resample_pos_embed(self, pos: Tensor, old_grid: tuple[int, int] | None, path: Any) -> Tensor:
        target = self.vit.pos_embed
        if pos.shape == target.shape:
            return pos
        npt = 0 if self.vit.no_embed_class else self.num_prefix_tokens
        n_old = pos.shape[1] - npt
        if old_grid is None:
            side = math.isqrt(n_old)
            if side * side != n_old:
                raise ConfigError(
                    f"{path}: pos_embed has {n_old} patch positions, which is not a square grid; "
                    "give the grid size (the file's metadata 'grid_size' or init_grid_size)"
                )
            old_grid = (side, side)
        print(f"[idrecog] resampling position embeddings from grid {tuple(old_grid)} to {self.grid_size}")
        return resample_abs_pos_embed(
            pos, new_size=list(self.grid_size), old_size=list(old_grid), num_prefix_tokens=npt
        )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _pretrained_kwargs(pretrained_file: str | None, architecture_changed: bool) -> dict[str, Any]:
    """``timm.create_model`` arguments for ``pretrained=True``: the local file (and its input size, so timm
    resamples the position embeddings from the right grid), and a non-strict load when depth or width are
    overridden (a 4-block encoder takes the first 4 blocks of a 12-block checkpoint)."""
    out: dict[str, Any] = {}
    if architecture_changed:
        out["pretrained_strict"] = False
    if pretrained_file is None:
        return out
    path = Path(pretrained_file)
    if not path.is_file():
        raise ConfigError(f"encoder.pretrained_file: {path} does not exist")
    if path.suffix == ".ckpt":
        raise ConfigError(
            f"encoder.pretrained_file {path}: a Lightning checkpoint, not timm weights; give it as encoder.init_from "
            "(or write timm weights with `idrecog export-encoder`)"
        )
    overlay: dict[str, Any] = {"file": str(path)}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("img_size"):  # written by `idrecog export-encoder`: timm reads the source grid from this
            h, w = (int(v) for v in str(meta["img_size"]).split(","))
            overlay["input_size"] = (3, h, w)
    out["pretrained_cfg_overlay"] = overlay
    return out


class _TimmLoadMessages(logging.Handler):
    """Collects what timm logs while it loads pretrained weights (missing and unexpected keys), to report."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._logger = logging.getLogger("timm.models")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "keys" in msg:
            self.messages.append(msg.split(" This ")[0])

    def __enter__(self) -> list[str]:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def extract_timm_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip our prefixes, keep only the ViT's tensors (drops decoders, heads of other modules, optimiser...)."""
    if any(k.startswith(("model.encoder.vit.", "encoder.vit.")) for k in state):
        for p in ("model.encoder.vit.", "encoder.vit."):
            sub = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
            if sub:
                return sub
    for p in _PREFIXES:
        if all(k.startswith(p) for k in state):
            return {k[len(p) :]: v for k, v in state.items()}
    return dict(state)


def _grid_from_meta(meta: dict[str, str]) -> tuple[int, int] | None:
    g = meta.get("grid_size")
    if not g:
        return None
    h, w = (int(v) for v in str(g).replace("x", ",").split(","))
    return h, w
