"""``ViTEncoder(pretrained=True)``: timm's own loader (``timm.create_model(pretrained=True)``) from a local file
through ``pretrained_cfg_overlay``, position embeddings resampled to the document grid, a one-line error offline
without a file, and checkpoints that rebuild without the file or the hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from idrecog.errors import ConfigError
from idrecog.lit.mae import MAEPretrainModule
from idrecog.lit.unified import UnifiedModule
from idrecog.models.encoder import ViTEncoder

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A stand-in for a downloaded timm checkpoint: square 224 x 224 grid, 2 blocks, a 1000-class head, no
    metadata (what the hub's ``model.safetensors`` holds)."""
    torch.manual_seed(3)
    model = timm.create_model(NAME, depth=2, num_classes=1000)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_local_file_loads_the_blocks_and_resamples_pos_embed_to_the_document_grid(public, capsys) -> None:
    model, path = public
    # a tagged name: the tag picks timm's pretrained config (a 21k-class head, dropped for our headless encoder)
    enc = ViTEncoder(f"{NAME}.augreg_in21k", img_size=(64, 112), depth=2, pretrained_file=str(path))
    assert enc.init_args["pretrained"] is True  # a file implies pretrained
    for k, v in model.blocks.state_dict().items():
        assert torch.equal(enc.vit.blocks.state_dict()[k], v), k
    assert torch.equal(enc.vit.patch_embed.proj.weight, model.patch_embed.proj.weight)
    assert torch.equal(enc.vit.cls_token, model.cls_token)
    # 14 x 14 -> 4 x 7 (non-square), the class token's embedding kept
    assert enc.grid_size == (4, 7) and enc.vit.pos_embed.shape == (1, 1 + 28, 192)
    expected = resample_abs_pos_embed(
        model.pos_embed, new_size=[4, 7], old_size=[14, 14], num_prefix_tokens=1
    )
    assert torch.allclose(enc.vit.pos_embed, expected, atol=1e-6)
    assert "every tensor loaded" in capsys.readouterr().out
    # and the encoder runs at the document size
    assert enc(torch.randn(2, 3, 64, 112)).shape == (2, 28, 192)


def test_fewer_blocks_than_the_file_load_the_first_ones_and_say_so(public, capsys) -> None:
    model, path = public
    enc = ViTEncoder(NAME, img_size=(32, 48), depth=1, pretrained_file=str(path))
    assert torch.equal(enc.vit.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    out = capsys.readouterr().out
    assert "Unexpected keys" in out and "blocks.1." in out


def test_an_exported_non_square_encoder_resamples_from_its_own_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = ViTEncoder(NAME, img_size=(32, 64), depth=1)  # grid 2 x 4
    path = tmp_path / "encoder.safetensors"
    # what `idrecog export-encoder` writes: timm keys plus the input size in the metadata
    save_file(
        {k: v.contiguous() for k, v in src.timm_state_dict().items()},
        str(path),
        metadata={"img_size": "32,64", "grid_size": "2,4"},
    )
    enc = ViTEncoder(NAME, img_size=(48, 80), depth=1, pretrained_file=str(path))
    expected = resample_abs_pos_embed(
        src.vit.pos_embed, new_size=[3, 5], old_size=[2, 4], num_prefix_tokens=1
    )
    assert torch.allclose(enc.vit.pos_embed, expected, atol=1e-6)
    assert torch.equal(enc.vit.blocks[0].mlp.fc1.weight, src.vit.blocks[0].mlp.fc1.weight)


def test_offline_without_a_file_is_a_one_line_config_error(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached either
    with pytest.raises(ConfigError, match="pretrained_file") as e:
        ViTEncoder(f"{NAME}.augreg_in21k", img_size=(32, 48), depth=1, pretrained=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": f"{NAME}.no_such_tag", "pretrained": True}, "augreg_in21k"),
        ({"name": NAME, "pretrained_file": "/no/such/file.safetensors"}, "does not exist"),
    ],
)
def test_bad_pretrained_settings_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ViTEncoder(img_size=(32, 48), depth=1, **kwargs)


def test_a_lightning_checkpoint_as_pretrained_file_points_to_init_from(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ConfigError, match="init_from"):
        ViTEncoder(NAME, img_size=(32, 48), depth=1, pretrained_file=str(ckpt))


def test_weights_that_do_not_fit_are_a_config_error(tmp_path: Path) -> None:
    wrong = timm.create_model("vit_small_patch16_224", depth=1, num_classes=0)  # 384 wide, not 192
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match="could not load the weights"):
        ViTEncoder(NAME, img_size=(32, 48), depth=1, pretrained_file=str(path))


def test_checkpoints_rebuild_without_the_file_or_the_hub(public) -> None:
    _, path = public
    enc = ViTEncoder(f"{NAME}.augreg_in21k", img_size=(32, 48), depth=2, pretrained_file=str(path))
    cat = {"tasks": [{"name": "kind", "type": "classification", "classes": ["a", "b"]}]}
    unified = UnifiedModule(catalogue=cat, encoder=enc)
    mae = MAEPretrainModule(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    for module in (unified, mae):
        stored = module.hparams["encoder"]["init_args"]
        assert (stored["pretrained"], stored["pretrained_file"], stored["init_from"]) == (False, None, None)
        assert stored["name"] == f"{NAME}.augreg_in21k"
        # rebuilding reads nothing (offline here, and the file is not named)
        assert ViTEncoder(**stored).grid_size == (2, 3)
