"""HeadContext.dot_pixels (the pixel decoder's last layer folded into the embeddings) equals the plain product."""

import pytest
import torch

from idrecog.models.pixel_decoder import PixelDecoder
from idrecog.tasks.base import HeadContext


def test_dot_pixels_equals_product_with_full_pixel_features() -> None:
    # float64: the fold is an identity of the maths, so the check should not depend on how a CPU's float32
    # kernels order their sums (a float32 gradient differed by 9e-4 relative on one element on one machine)
    torch.manual_seed(0)
    dec = PixelDecoder(in_dim=24, dim=16, grid_size=(2, 3)).double()
    tokens = torch.randn(2, 6, 24, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    full = dec(tokens)  # [B, D, 8, 12]
    assert full.shape == (2, 16, 8, 12)
    ref = torch.einsum("bkd,bdhw->bkhw", emb, full)
    ctx = HeadContext(
        pixel_feats=None, image_size=(32, 48), pixel_hidden=dec.forward_hidden(tokens), pixel_decoder=dec
    )
    folded = ctx.dot_pixels(emb)
    torch.testing.assert_close(folded, ref, rtol=1e-10, atol=1e-10)
    # same gradients reach the pixel decoder's last layer, the tokens and the embeddings
    g_ref = torch.autograd.grad(ref.square().sum(), [dec.proj.weight, tokens, emb])
    g_fold = torch.autograd.grad(folded.square().sum(), [dec.proj.weight, tokens, emb])
    for a, b in zip(g_ref, g_fold, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # plugins that read pixel_feats get the full map, computed on access
    torch.testing.assert_close(ctx.pixel_feats, full, rtol=1e-10, atol=1e-10)


def test_dot_pixels_without_pixel_features_is_a_clear_error() -> None:
    ctx = HeadContext(pixel_feats=None, image_size=(16, 16))
    with pytest.raises(ValueError, match="no pixel features"):
        ctx.dot_pixels(torch.randn(1, 2, 4))
