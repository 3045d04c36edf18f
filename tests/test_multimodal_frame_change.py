"""The multimodal converter's tilt-change input: what changes across the angle frames, not what they show."""

from __future__ import annotations

import pytest
import torch

from idrecog.models.multimodal import CHANGE, FRAME, KINDS, MultimodalQueries
from tests.test_queries_text_mm import CAT, COUNTS, USER_STATE, H, W, make_tiny_bert, tiny_multimodal


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert"))


def provider(tiny_bert: str, **kw) -> MultimodalQueries:
    torch.manual_seed(0)
    # add: film's zero output projection would make the no-leak checks below trivially true
    kw.setdefault("combine", "add")
    p = tiny_multimodal(tiny_bert, **kw)  # separate frame embedding, every task through the converter
    p.build(CAT, COUNTS, 24, user_spec=USER_STATE)
    return p.eval()


def series() -> dict:
    """Sample 0: two identical angle frames; 1: identical too, other content and flash; 2: the second angle
    frame changes in one patch; 3: only one angle frame present."""
    torch.manual_seed(1)
    flash = torch.randn(4, 3, H, W)
    a = torch.randn(4, 1, 3, H, W).repeat(1, 2, 1, 1, 1)
    a[2, 1, :, :16, :16] += 1.5  # a local colour change, as a genuine hologram under tilt
    a[3, 1] = 7.0  # absent below: must not count
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[3, 2] = False
    return {"image": torch.randn(4, 3, H, W), "assoc": {"flash": flash, "angles": a, "mask": mask}}


def test_change_token_sees_change_not_content(tiny_bert: str) -> None:
    p = provider(tiny_bert)
    batch = series()
    with torch.no_grad():
        cells, token, valid = p.encode_change(batch["assoc"])
    assert cells.shape == (4, 2, 2, 16) and token.shape == (4, 1, 16)
    assert valid[:, 0].tolist() == [True, True, True, False]  # one angle frame: no change to measure
    # static series give the same token and cells whatever they show (the embedding of no change is zero)
    torch.testing.assert_close(token[0], token[1])
    torch.testing.assert_close(cells[0], cells[1])
    assert not torch.allclose(token[2], token[0], atol=1e-4)
    # only the changed cell (the left one, where the patch changed) differs from a static cell
    torch.testing.assert_close(cells[2, :, 1], cells[0, :, 1])
    assert not torch.allclose(cells[2, :, 0], cells[0, :, 0], atol=1e-4)
    # the flash is lit differently everywhere; it is not part of the tilt change
    batch["assoc"]["flash"] += 3.0
    with torch.no_grad():
        torch.testing.assert_close(p.encode_change(batch["assoc"])[1], token)


def test_change_token_enters_angle_tasks_only_and_is_masked(tiny_bert: str) -> None:
    p = provider(tiny_bert)
    batch = series()
    with torch.no_grad():
        q = p(CAT.names, 4, batch)
    for spec in CAT:
        kinds = p.last_inputs[spec.name]["kinds"]
        assert int((kinds == CHANGE).sum()) == int("angles" in spec.uses and spec.uses_frames), spec.name
    holo = p.last_inputs["hologram"]
    assert holo["valid"][:, holo["kinds"] == CHANGE][:, 0].tolist() == [True, True, True, False]
    assert KINDS[CHANGE] == "change" and (holo["kinds"] == FRAME).sum() == 3 * 2
    # what sample 3 lacks (its second angle frame) cannot leak into its queries
    batch["assoc"]["angles"][3, 1] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(p(CAT.names, 4, batch)[3], q[3])


def test_frame_change_off_is_the_plain_converter(tiny_bert: str) -> None:
    p = provider(tiny_bert, frame_change=False)
    p(["hologram"], 4, series())
    assert not (p.last_inputs["hologram"]["kinds"] == CHANGE).any()
    assert not any(k.startswith("change_") for k in p.state_dict())
    assert p.init_args["frame_change"] is False
