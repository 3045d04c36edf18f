"""Masked autoencoder pretraining of the ViT encoder (He et al., "Masked Autoencoders Are Scalable Vision
Learners", 2021), after facebookresearch/mae ``models_mae.py``, for non-square document images.

The encoder is :class:`idrecog.models.encoder.ViTEncoder` held as ``self.encoder`` (timm model under
``encoder.vit``), the same attribute path as in the unified model, so pretrained weights pass over unchanged.

The encoder sees only the kept patches (plus the class token); the light decoder gets the encoded tokens back
in place together with a shared mask token at every removed position, and predicts the pixels.
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from idrecog.errors import ConfigError
from idrecog.models.encoder import ViTEncoder


def decoder_pos_embed(dim: int, grid_hw: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
    """Fixed 2-D sin-cos position embeddings of the decoder (timm's, the task decoder's too) for an ``h x w``
    patch grid in row-major token order -> [num_prefix_tokens + h * w, dim]; prefix (class token) rows are 0."""
    if dim % 4:
        raise ConfigError(f"2-D sin-cos embedding dimension must be a multiple of 4, got {dim}")
    emb = build_sincos2d_pos_embed([int(grid_hw[0]), int(grid_hw[1])], dim)
    return torch.cat([emb.new_zeros(num_prefix_tokens, dim), emb]) if num_prefix_tokens else emb


def default_decoder_size(encoder_dim: int) -> tuple[int, int, int]:
    """(width, depth, heads) of the MAE decoder sized to the encoder: ViT-B/L/H -> 512 x 8 (the paper's);
    ViT-S -> 256 x 4; ViT-Ti and smaller -> 128 x 2."""
    if encoder_dim >= 768:
        return 512, 8, 16
    if encoder_dim >= 384:
        return 256, 4, 8
    return 128, 2, 4


class MaskedAutoencoder(nn.Module):
    """MAE with a :class:`ViTEncoder` backbone.

    Args:
        encoder: the ViT to pretrain.
        mask_ratio: fraction of patches removed per image (default for ``forward``).
        decoder_dim / decoder_depth / decoder_heads: decoder size; ``None`` picks :func:`default_decoder_size`.
        norm_pix_loss: regress per-patch normalised pixels (mean 0, variance 1 in each target patch).
        mlp_ratio: decoder MLP ratio.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        mask_ratio: float = 0.75,
        decoder_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        norm_pix_loss: bool = True,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        _check_ratio(mask_ratio)
        dd, ddepth, dheads = default_decoder_size(encoder.embed_dim)
        decoder_dim = decoder_dim or dd
        decoder_depth = decoder_depth if decoder_depth is not None else ddepth
        decoder_heads = decoder_heads or dheads
        if decoder_dim % decoder_heads:
            raise ConfigError(f"decoder_dim {decoder_dim} is not divisible by decoder_heads {decoder_heads}")
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = encoder.patch_size
        self.grid_size = encoder.grid_size
        self.num_patches = encoder.num_patches
        self.num_prefix_tokens = encoder.num_prefix_tokens
        p, d = self.patch_size, encoder.embed_dim

        # ----- decoder
        self.decoder_embed = nn.Linear(d, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed",
            decoder_pos_embed(decoder_dim, self.grid_size, self.num_prefix_tokens).unsqueeze(0),
            persistent=False,  # fixed, rebuilt from the grid: not part of the weights
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_layer_norm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = _layer_norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * 3, bias=True)
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads
        self._init_decoder()

    def _init_decoder(self) -> None:
        # MAE init for the new parts only; the encoder keeps timm's init (or its pretrained weights)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(m, nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (timm's ``param_groups_weight_decay`` reads this)."""
        names = {"mask_token"}
        names |= {f"encoder.vit.{n}" for n in ("pos_embed", "cls_token", "reg_token", "dist_token")}
        return names

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: Tensor) -> Tensor:
        """imgs: [N, 3, H, W] -> x: [N, L, p*p*3], L = (H/p) * (W/p), row-major; per patch (row, col, channel)."""
        p = self.patch_size
        n, c, hh, ww = imgs.shape
        if hh % p or ww % p:
            raise ValueError(f"image size {(hh, ww)} is not a multiple of the patch size {p}")
        h, w = hh // p, ww // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: Tensor, grid_hw: tuple[int, int] | None = None) -> Tensor:
        """x: [N, L, p*p*3] -> imgs: [N, 3, H, W]; ``grid_hw`` (h, w) defaults to the encoder's grid."""
        p = self.patch_size
        h, w = grid_hw or self.grid_size
        if h * w != x.shape[1]:
            raise ValueError(f"{x.shape[1]} patches do not fill a {h} x {w} grid")
        x = x.reshape(x.shape[0], h, w, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], 3, h * p, w * p)

    # ------------------------------------------------------------------ masking
    @staticmethod
    def num_keep(num_patches: int, mask_ratio: float) -> int:
        """Patches kept per sample: round(L * (1 - mask_ratio)), at least 1."""
        return max(1, min(num_patches, round(num_patches * (1.0 - mask_ratio))))

    def random_ids(
        self,
        n: int,
        num_patches: int,
        mask_ratio: float,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample shuffle by argsort of uniform noise.

        Returns ids_keep [N, K], mask [N, L] (0 keep, 1 remove; original order), ids_restore [N, L].
        """
        _check_ratio(mask_ratio)
        len_keep = self.num_keep(num_patches, mask_ratio)
        noise = torch.rand(n, num_patches, device=device, generator=generator)  # [N, L] in [0, 1)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(n, num_patches, device=device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle to the original patch order
        return ids_keep, mask, ids_restore

    def random_masking(
        self, x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [N, L, D] -> x_masked [N, K, D], mask [N, L] (0 keep, 1 remove), ids_restore [N, L];
        K = round(L * (1 - mask_ratio))."""
        n, num_patches, d = x.shape
        ids_keep, mask, ids_restore = self.random_ids(n, num_patches, mask_ratio, x.device, generator)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, d))
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ forward
    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: [N, 3, H, W] -> latent [N, P + K, D] of the kept patches, mask [N, L], ids_restore [N, L];
        P = prefix (class) tokens."""
        n = imgs.shape[0]
        ids_keep, mask, ids_restore = self.random_ids(n, self.num_patches, mask_ratio, imgs.device, generator)
        return self.encoder.forward_visible(imgs, ids_keep), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent: [N, P + K, D] (K < L: mask tokens fill the removed positions; K = L: all given),
        ids_restore: [N, L] -> pred [N, L, p*p*3]."""
        x = self.decoder_embed(latent)  # [N, P + K, Dd]
        npt = self.num_prefix_tokens
        num_patches = ids_restore.shape[1]
        if x.shape[1] - npt != num_patches:
            mask_tokens = self.mask_token.to(x.dtype).expand(x.shape[0], num_patches + npt - x.shape[1], -1)
            x_ = torch.cat([x[:, npt:], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
            x_ = torch.gather(
                x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
            )  # unshuffle
            x = torch.cat([x[:, :npt], x_], dim=1)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, npt:]

    def patch_targets(self, imgs: Tensor, select: Tensor | None = None) -> Tensor:
        """imgs: [N, 3, H, W] -> regression targets [N, L, p*p*3] (per-patch normalised when norm_pix_loss);
        with ``select`` (bool [N, L]) only the selected patches, [M, p*p*3] in row-major order."""
        target = self.patchify(imgs)
        if select is not None:
            target = target[select]
        if self.norm_pix_loss:
            var, mean = torch.var_mean(target, dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """imgs: [N, 3, H, W]; pred: [N, L, p*p*3]; mask: [N, L] (1 = removed) -> mean MSE over removed patches.

        Targets are built for the removed patches only (the loss never reads the others)."""
        removed = mask.bool()
        target = self.patch_targets(imgs, removed)  # [M, p*p*3]
        loss = ((pred[removed].float() - target.float()) ** 2).mean(dim=-1)  # [M], mean loss per patch
        return loss.sum() / loss.new_tensor(max(loss.numel(), 1))

    def forward(
        self, imgs: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: [N, 3, H, W] -> (loss [], pred [N, L, p*p*3], mask [N, L])."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(
        self, imgs: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """For pictures. imgs: [N, 3, H, W] -> {"masked", "reconstruction", "pasted"}: [N, 3, H, W] in the input's
        space, and "mask": [N, 1, H, W] (1 = removed). With norm_pix_loss the prediction is de-normalised with
        each target patch's own mean and variance (as in the MAE demo), so colours are approximate."""
        _, pred, mask = self.forward(imgs, mask_ratio, generator)
        if self.norm_pix_loss:
            target = self.patchify(imgs)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        recon = self.unpatchify(pred.to(imgs.dtype))
        p = self.patch_size
        m = self.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3).to(imgs.dtype))[:, :1]
        return {
            "masked": imgs * (1 - m),
            "reconstruction": recon,
            "pasted": imgs * (1 - m) + recon * m,
            "mask": m,
        }


def _layer_norm(dim: int, **kwargs) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
