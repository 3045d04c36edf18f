"""``idrecog data check`` finds every kind of bad input with the right file and line; ``data show`` draws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from idrecog.cli.data import main
from idrecog.data.check import check_dataset
from idrecog.errors import DataFormatError


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_good_fixture_passes_with_summary(tiny_dataset: Path, capsys) -> None:
    assert main(["check", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("OK:") and ": field '" not in out
    for name in (
        "doc_type",
        "card_mask",
        "fields",
        "hologram",
        "image_quality",
        "ald_id_card",
        "cst_passport",
    ):
        assert name in out
    assert "genuine=" in out and "boxes/sample" in out and "range [" in out and "document=" in out
    assert "hologram: 1 labelled samples lack frames" in out


def test_every_bad_input_kind_is_reported_with_file_and_line(tiny_dataset: Path, capsys) -> None:
    train = tiny_dataset / "train.jsonl"
    lines = _lines(train)
    w, h = 96, 64
    (tiny_dataset / "images" / "train_000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # 1: corrupt image
    lines[1]["image"] = "images/missing.png"  # 2: missing image
    lines[2]["labels"]["tampering"] = "forged"  # 3: class not in the catalogue
    lines[3]["labels"]["fields"][0]["box"] = [0, 0, w + 50, 10]  # 4: box outside the image
    lines[4]["labels"]["fields"][0]["box"] = [10, 10, 5, 20]  # 5: negative-size box
    Image.new("L", (w // 2, h // 2)).save(tiny_dataset / "masks" / "small.png")
    lines[5]["labels"]["card_mask"] = "masks/small.png"  # 6: mask size mismatch
    lines[6]["labels"]["image_quality"] = float("nan")  # 7: NaN regression (json writes NaN)
    lines[7]["labels"]["image_quality"] = 3.0  # 8: out of range
    lines[8]["doc_type"] = "xx_card"  # 9: unknown doc type
    lines[9]["labels"]["age"] = "adult"  # 10: unknown task
    text = [json.dumps(x) for x in lines]
    text[10] = '{"id": "broken", "image": '  # 11: not valid JSON
    train.write_text("\n".join(text) + "\n")
    val = tiny_dataset / "val.jsonl"
    (tiny_dataset / "frames" / "val_000_flash.png").unlink()  # val 1: a frame file is missing

    res = check_dataset(tiny_dataset)
    found = {(Path(p.file).name, p.line, p.field) for p in res.problems}
    expected = {
        ("train.jsonl", 1, "image"),
        ("train.jsonl", 2, "image"),
        ("train.jsonl", 3, "labels.tampering"),
        ("train.jsonl", 4, "labels.fields"),
        ("train.jsonl", 5, "labels.fields"),
        ("train.jsonl", 6, "labels.card_mask"),
        ("train.jsonl", 7, "labels.image_quality"),
        ("train.jsonl", 8, "labels.image_quality"),
        ("train.jsonl", 9, "doc_type"),
        ("train.jsonl", 10, "labels.age"),
        ("train.jsonl", 11, "<line>"),
        ("val.jsonl", 1, "assoc.flash"),
    }
    assert found == expected
    assert all(p.file in (str(train), str(val)) for p in res.problems)

    assert main(["check", str(tiny_dataset)]) == 1
    out = capsys.readouterr().out
    assert f"{train}:6: field 'labels.card_mask': " in out and "differs from the image size" in out
    assert f"{train}:11: field '<line>': not valid JSON" in out
    assert "12 problem(s)" in out


def test_missing_folder_or_catalogue_raises(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="not found"):
        check_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"tasks\.yaml"):
        check_dataset(tmp_path / "empty")


def test_show_writes_a_png(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    assert (
        main(["show", str(tiny_dataset), "--split", "train", "--n", "4", "--seed", "1", "--out", str(out)])
        == 0
    )
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 2 * 320 and im.height > 200
    assert "wrote" in capsys.readouterr().out
