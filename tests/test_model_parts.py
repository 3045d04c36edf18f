"""Unified model parts: query providers, task decoder (block-diagonal attention), pixel decoder, interpreter
routing, and the forward shapes of every task of the default catalogue."""

from __future__ import annotations

import pytest
import torch

from idrecog.errors import ConfigError
from idrecog.models.decoder import TaskDecoder, block_diagonal_mask
from idrecog.models.pixel_decoder import PixelDecoder
from idrecog.models.queries import LearnedQueries, create_query_provider, list_query_providers
from idrecog.models.unified import UnifiedModel
from idrecog.tasks.catalogue import default_catalogue
from tests.test_model_fakes import DIM, IMG, fake_batch, fake_catalogue, tiny_parts

torch.manual_seed(0)


def _model(cross_task_attention: bool = False) -> UnifiedModel:
    torch.manual_seed(0)
    return UnifiedModel(fake_catalogue(), **tiny_parts(cross_task_attention)).eval()


def test_query_registry_and_learned_tokens_in_task_order() -> None:
    assert "learned" in list_query_providers()
    with pytest.raises(ConfigError, match="unknown query provider"):
        create_query_provider("nope")
    q = create_query_provider("learned", std=0.02)
    assert isinstance(q, LearnedQueries)
    cat = fake_catalogue()
    q.build(cat, {"a": 2, "b": 1, "c": 3}, 8)
    out = q(["c", "a"], batch_size=5)
    assert out.shape == (5, 5, 8)
    assert torch.equal(out[0, :3], q.embeds["c"]) and torch.equal(out[0, 3:], q.embeds["a"])
    assert 0.005 < float(q.embeds["c"].detach().std()) < 0.06


def test_block_diagonal_mask() -> None:
    m = block_diagonal_mask([slice(0, 2), slice(2, 3)], 3)
    assert m.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


@pytest.mark.parametrize("memory_pos", ["sincos", "learned", "none"])
def test_decoder_projects_memory_and_keeps_query_shape(memory_pos: str) -> None:
    dec = TaskDecoder(dim=32, depth=1, num_heads=4, memory_pos=memory_pos)
    dec.build(memory_dim=48, grid_size=(2, 3))
    out = dec(torch.randn(2, 5, 32), torch.randn(2, 6, 48), [slice(0, 2), slice(2, 5)])
    assert out.shape == (2, 5, 32)
    if memory_pos != "none":  # without a position table any number of image tokens is accepted
        with pytest.raises(ConfigError, match="built for 6 image tokens"):
            dec(torch.randn(2, 5, 32), torch.randn(2, 7, 48), [slice(0, 5)])


def test_pixel_decoder_is_stride_four() -> None:
    pd = PixelDecoder(in_dim=48, dim=16, grid_size=(4, 6))
    assert pd(torch.randn(2, 24, 48)).shape == (2, 16, 16, 24)


@pytest.mark.parametrize("cross", [False, True])
def test_task_output_independent_of_other_tasks_only_with_block_diagonal_attention(cross: bool) -> None:
    model = _model(cross_task_attention=cross)
    images = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        alone = model(images, tasks=["a"])["outputs"]["a"]["logits"]
        together = model(images, tasks=["b", "a", "c"])["outputs"]["a"]["logits"]
    same = torch.allclose(alone, together, atol=1e-5)
    assert same is (not cross)


def test_forward_shapes_and_known_routing_fake_catalogue() -> None:
    model = _model()
    out = model(torch.randn(3, 3, *IMG))
    assert set(out["outputs"]) == {"a", "b", "c"}
    assert out["outputs"]["a"]["logits"].shape == (3, 3)
    assert out["outputs"]["c"]["value"].shape == (3,)
    assert out["task_feats"]["a"].shape == (3, 2, DIM)  # fake_label owns 2 query tokens
    for t in "abc":
        assert out["gate_logits"][t].shape == (3, 2)
        assert out["routed"][t].dtype == torch.bool and out["routed"][t].all()
    with pytest.raises(ConfigError, match="unknown task"):
        model(torch.randn(1, 3, *IMG), tasks=["nope"])


def test_forward_shapes_every_task_of_the_default_catalogue() -> None:
    from benchmarks import common as testing

    cat = default_catalogue()
    torch.manual_seed(0)
    model = UnifiedModel(cat, **tiny_parts(), task_options={"detection": {"num_queries": 5}}).eval()
    assert model.pixel_decoder is not None  # segmentation needs pixel features
    batch = testing.make_random_batch(cat, 2, IMG)
    with torch.no_grad():
        out = model(batch["image"], batch=batch)
    assert set(out["outputs"]) == set(cat.names)
    assert out["task_feats"]["fields"].shape == (2, 5, DIM)
    for name, tt in model.task_types.items():
        outputs = out["outputs"][name]
        declared = tt.output_shapes(2, IMG)
        for key, value in outputs.items():
            assert value.shape[0] == 2, (name, key)
            if declared is not None and key in declared:
                assert tuple(value.shape) == tuple(declared[key]), (name, key)
        assert out["gate_logits"][name].shape == (2, len(cat.types()))


def test_forced_wrong_routing_withholds_the_output() -> None:
    model = _model()
    itp = model.interpreter
    wrong = itp.type_names.index("fake_value")
    with torch.no_grad():
        itp.guidance[-1].bias.zero_()
        itp.guidance[-1].bias[0] = 1e4  # every task applies...
        itp.guidance[-1].bias[1 + wrong] = 1e4  # ...and the gate opens the fake_value group for every task
        out = model(torch.randn(2, 3, *IMG), route="guided")
    assert not out["routed"]["a"].any() and not out["routed"]["b"].any()  # no fake_label unit there: withheld
    assert out["routed"]["c"].all()
    assert out["outputs"]["a"]["logits"].shape == (2, 3)  # computed (export-friendly) but marked withheld
    known = model(torch.randn(2, 3, *IMG), route="known")
    assert all(known["routed"][t].all() for t in "abc")  # training routing ignores the gate
    with pytest.raises(ConfigError):
        model(torch.randn(1, 3, *IMG), route="sideways")  # type: ignore[arg-type]


def test_guidance_unit_learns_to_route_to_the_known_type() -> None:
    model = _model()
    itp = model.interpreter
    opt = torch.optim.Adam(itp.guidance.parameters(), lr=1e-2)
    images = torch.randn(4, 3, *IMG)
    with torch.no_grad():
        feats = model(images)["task_feats"]
    from idrecog.tasks.base import HeadContext

    ctx = HeadContext(pixel_feats=None, image_size=IMG)
    for _ in range(60):
        _, logits, applies, _ = itp(feats, ctx, "known")
        loss = itp.gate_loss(logits, applies, torch.ones(4, 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(images, route="guided")
    assert float(itp.gate_accuracy(out["gate_logits"])) == 1.0
    assert all(out["routed"][t].all() for t in "abc")


def test_fake_batch_runs_through_the_model() -> None:
    model = _model()
    batch = fake_batch(fake_catalogue(), b=2)
    out = model(batch["image"], batch=batch)
    assert out["outputs"]["b"]["logits"].shape == (2, 2)


def test_hybrid_vit_encoder_counts_its_stem_in_the_patch_size() -> None:
    """A timm hybrid ViT (CNN stem, then 4-pixel patches of its stride-4 features) tokenises like a 16-pixel ViT:
    the unified model and MAE see the same grid and patch size, and the stem receives gradients."""
    from idrecog.models.encoder import ViTEncoder
    from idrecog.models.mae import MaskedAutoencoder

    enc = ViTEncoder(
        "vit_tiny_r_s16_p8_224",
        img_size=(64, 96),
        depth=1,
        embed_dim=48,
        num_heads=2,
        model_kwargs={"patch_size": 4},
    )
    assert enc.patch_size == 16 and enc.grid_size == (4, 6)
    parts = tiny_parts()
    parts["encoder"] = enc
    model = UnifiedModel(fake_catalogue(), **parts)
    batch = fake_batch(fake_catalogue(), b=2)
    images = torch.nn.functional.interpolate(batch["image"], size=(64, 96))
    out = model(images, batch={**batch, "image": images})
    assert out["outputs"]["b"]["logits"].shape == (2, 2)
    sum(v.float().sum() for o in out["outputs"].values() for v in o.values()).backward()
    stem = enc.vit.patch_embed.backbone.conv.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    mae = MaskedAutoencoder(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    loss, pred, mask = mae(torch.randn(2, 3, 64, 96))[:3]
    assert torch.isfinite(loss) and pred.shape == (2, 24, 16 * 16 * 3) and mask.shape == (2, 24)
    with pytest.raises(ConfigError, match=r"img_size \[72, 96\]"):
        ViTEncoder("vit_tiny_r_s16_p8_224", img_size=(72, 96), depth=1, model_kwargs={"patch_size": 4})
