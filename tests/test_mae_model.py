"""MaskedAutoencoder: masking, un-shuffling, loss on removed patches only, patch (un)folding, sin-cos embeddings."""

from __future__ import annotations

import pytest
import torch

from idrecog.errors import ConfigError
from idrecog.models.encoder import ViTEncoder
from idrecog.models.mae import MaskedAutoencoder, decoder_pos_embed, default_decoder_size

IMG = (48, 80)  # (H, W): a 3 x 5 patch grid, H != W


@pytest.fixture(scope="module")
def mae() -> MaskedAutoencoder:
    torch.manual_seed(0)
    enc = ViTEncoder("vit_tiny_patch16_224", img_size=IMG, depth=1)
    return MaskedAutoencoder(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.6, 0.75, 0.9])
def test_random_masking_keeps_round_l_times_keep_ratio(mae: MaskedAutoencoder, ratio: float) -> None:
    n, length, d = 5, mae.num_patches, 7
    x = torch.randn(n, length, d)
    x_masked, mask, ids_restore = mae.random_masking(x, ratio)
    keep = round(length * (1 - ratio))
    assert x_masked.shape == (n, keep, d)
    assert mask.shape == (n, length) and ids_restore.shape == (n, length)
    assert torch.all(mask.sum(dim=1) == length - keep)  # per sample, not just on average
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # the kept tokens are exactly those where mask == 0
    for i in range(n):
        kept = x[i][mask[i] == 0]
        assert torch.equal(torch.sort(kept[:, 0]).values, torch.sort(x_masked[i, :, 0]).values)


def test_masks_differ_between_samples_and_follow_the_generator(mae: MaskedAutoencoder) -> None:
    x = torch.randn(64, mae.num_patches, 4)
    _, mask, _ = mae.random_masking(x, 0.6)
    assert len({tuple(m.tolist()) for m in mask}) > 1
    _, m1, _ = mae.random_masking(x, 0.6, generator=torch.Generator().manual_seed(3))
    _, m2, _ = mae.random_masking(x, 0.6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)


def test_ids_restore_unshuffles_to_the_original_order(mae: MaskedAutoencoder) -> None:
    n, length = 4, mae.num_patches
    x = torch.arange(n * length, dtype=torch.float32).reshape(n, length, 1).expand(-1, -1, 3).contiguous()
    ids_keep, _mask, ids_restore = mae.random_ids(n, length, 0.6, x.device)
    # rebuild the shuffled sequence (kept first, then removed) as the decoder sees it, then unshuffle
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, : ids_keep.shape[1]], ids_keep)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 3))
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(restored, x)
    assert not torch.equal(shuffled, x)  # (it did shuffle)


def test_decoder_puts_encoded_tokens_back_in_place() -> None:
    # with no decoder blocks each prediction depends only on the token at its own position, so the gradients
    # show where forward_decoder placed every encoded token
    enc = ViTEncoder("vit_tiny_patch16_224", img_size=IMG, depth=1)
    m = MaskedAutoencoder(enc, decoder_dim=32, decoder_depth=0, decoder_heads=2)
    imgs = torch.randn(2, 3, *IMG)
    latent, mask, ids_restore = m.forward_encoder(imgs, 0.6, generator=torch.Generator().manual_seed(0))
    k = m.num_keep(m.num_patches, 0.6)
    assert latent.shape == (2, m.num_prefix_tokens + k, enc.embed_dim)
    latent = latent.detach().requires_grad_(True)
    pred = m.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, m.num_patches, 16 * 16 * 3)
    ids_keep = torch.argsort(ids_restore, dim=1)[:, :k]
    for j in range(k):
        patch = int(ids_keep[1, j])
        (g,) = torch.autograd.grad(pred[1, patch].sum(), latent, retain_graph=True)
        touched = (g.abs().sum(-1) > 0).nonzero().tolist()
        assert touched == [[1, m.num_prefix_tokens + j]]
    removed = int((mask[1] == 1).nonzero()[0, 0])
    (g,) = torch.autograd.grad(pred[1, removed].sum(), latent, allow_unused=True)
    assert g is None or g.abs().sum() == 0


def test_loss_ignores_visible_patches(mae: MaskedAutoencoder) -> None:
    torch.manual_seed(1)
    imgs = torch.randn(2, 3, *IMG)
    loss, pred, mask = mae(imgs, mask_ratio=0.6)
    base = mae.forward_loss(imgs, pred, mask)
    assert torch.allclose(base, loss)
    visible = (mask[0] == 0).nonzero()[0, 0]
    masked = (mask[0] == 1).nonzero()[0, 0]
    p2 = pred.clone()
    p2[0, visible] += 5.0
    assert torch.equal(mae.forward_loss(imgs, p2, mask), base)
    p3 = pred.clone()
    p3[0, masked] += 5.0
    assert mae.forward_loss(imgs, p3, mask) > base


def test_loss_equals_the_reference_over_all_patches(mae: MaskedAutoencoder) -> None:
    # targets are built for removed patches only; the value must equal MAE's formula over all L patches
    torch.manual_seed(2)
    imgs = torch.randn(3, 3, *IMG)
    loss, pred, mask = mae(imgs, mask_ratio=0.6)
    full = mae.patch_targets(imgs)
    reference = (((pred - full) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, reference, rtol=1e-5)
    assert torch.allclose(mae.patch_targets(imgs, mask.bool()), full[mask.bool()])


@pytest.mark.parametrize("linear_path", [True, False])
def test_embed_visible_equals_gathered_full_embedding(
    mae: MaskedAutoencoder, linear_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = mae.encoder
    assert enc._linear_patch_embed()  # timm's conv patch embedding takes the per-patch linear path
    if not linear_path:
        monkeypatch.setattr(type(enc), "_linear_patch_embed", lambda self: False)
    torch.manual_seed(3)
    imgs = torch.randn(4, 3, *IMG)
    ids_keep = torch.argsort(torch.rand(4, mae.num_patches), dim=1)[:, :6]
    full = enc.embed(imgs)
    expected = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert torch.allclose(enc.embed_visible(imgs, ids_keep), expected, atol=1e-5)
    if linear_path:  # another input size would pair pixels with the wrong position embeddings
        with pytest.raises(ValueError, match="grid"):
            enc.embed_visible(torch.randn(1, 3, IMG[0] + 16, IMG[1]), ids_keep[:1])


def test_norm_pix_targets_are_per_patch_normalised(mae: MaskedAutoencoder) -> None:
    imgs = torch.rand(1, 3, *IMG) * 3 + 2
    t = mae.patch_targets(imgs)
    assert torch.allclose(t.mean(-1), torch.zeros(1, mae.num_patches), atol=1e-4)
    assert torch.allclose(t.var(-1), torch.ones(1, mae.num_patches), atol=1e-2)


def test_patchify_unpatchify_inverse_non_square(mae: MaskedAutoencoder) -> None:
    imgs = torch.randn(3, 3, *IMG)
    x = mae.patchify(imgs)
    assert x.shape == (3, (IMG[0] // 16) * (IMG[1] // 16), 16 * 16 * 3)
    assert torch.equal(mae.unpatchify(x), imgs)
    # patch k is the k-th patch in row-major order: patch (row 1, col 2) of a 5-wide grid is index 7
    assert torch.equal(x[:, 7].reshape(3, 16, 16, 3).permute(0, 3, 1, 2), imgs[:, :, 16:32, 32:48])
    with pytest.raises(ValueError):
        mae.unpatchify(x, grid_hw=(5, 3 + 1))


def test_decoder_position_embedding_for_a_non_square_grid() -> None:
    h, w, d = 3, 5, 32
    emb = decoder_pos_embed(d, (h, w), num_prefix_tokens=1)
    assert emb.shape == (1 + h * w, d)
    assert torch.all(emb[0] == 0)
    grid = emb[1:].reshape(h, w, d)
    assert not torch.equal(grid[0, 1], grid[1, 0])  # not symmetric in h/w
    transposed = decoder_pos_embed(d, (w, h)).reshape(w, h, d)
    assert not torch.allclose(transposed.transpose(0, 1), grid)
    assert len({tuple(v.tolist()) for v in emb[1:]}) == h * w  # every position distinct
    with pytest.raises(ConfigError, match="multiple of 4"):
        decoder_pos_embed(30, (h, w))


def test_the_benchmarks_all_patches_baseline_runs_and_uses_its_mask_token() -> None:
    torch.manual_seed(0)
    enc = ViTEncoder("vit_tiny_patch16_224", img_size=IMG, depth=1)
    from benchmarks.mae_speed import AllPatchesMAE

    m = AllPatchesMAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    imgs = torch.randn(2, 3, *IMG)
    loss, pred, mask = m(imgs, mask_ratio=0.6, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, m.num_patches, 768) and torch.all(mask.sum(1) == m.num_patches - 6)
    loss.backward()
    assert m.enc_mask_token.grad is not None and m.enc_mask_token.grad.abs().sum() > 0
    # removed patches' pixels do not reach the encoder
    latent, mask, _ = m.forward_encoder(imgs, 0.6, generator=torch.Generator().manual_seed(5))
    noisy = imgs.clone()
    removed = m.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 768))
    noisy = noisy + removed * torch.randn_like(noisy) * 10
    latent2, _, _ = m.forward_encoder(noisy, 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(latent, latent2, atol=1e-5)


def test_decoder_defaults_sized_to_encoder_and_bad_values_rejected() -> None:
    assert default_decoder_size(768) == (512, 8, 16)
    assert default_decoder_size(192)[0] < 512
    enc = ViTEncoder("vit_tiny_patch16_224", img_size=IMG, depth=1)
    m = MaskedAutoencoder(enc)
    assert (m.decoder_dim, m.decoder_depth) == default_decoder_size(192)[:2]
    with pytest.raises(ConfigError):
        MaskedAutoencoder(enc, mask_ratio=1.0)


def test_reconstruct_pastes_visible_patches(mae: MaskedAutoencoder) -> None:
    imgs = torch.randn(2, 3, *IMG)
    out = mae.reconstruct(imgs, 0.6, generator=torch.Generator().manual_seed(0))
    keep = out["mask"] == 0
    assert torch.equal((out["pasted"] * keep), (imgs * keep))
    assert torch.all(out["masked"][(~keep).expand_as(imgs)] == 0)
