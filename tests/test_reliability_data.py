"""Bad samples under data.on_error raise | skip: one case per kind, the pre-flight cache, load-time drops,
path escapes and the decompression-bomb guard."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from idrecog.data.collate import SkippingCollator
from idrecog.data.datamodule import IdDataModule
from idrecog.data.dataset import IdDataset
from idrecog.data.preflight import preflight_scan
from idrecog.errors import DataFormatError

N_TRAIN = 6


def _lines(root: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines() if x.strip()]


def _write(root: Path, lines: list[dict[str, Any]]) -> None:
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def _edit_label(task: str, value: Any) -> Callable[[Path, dict[str, Any]], None]:
    def f(root: Path, line: dict[str, Any]) -> None:
        line["labels"][task] = value

    return f


def _corrupt_image(root: Path, line: dict[str, Any]) -> None:
    (root / line["image"]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def _missing_image(root: Path, line: dict[str, Any]) -> None:
    (root / line["image"]).unlink()


def _missing_frame(root: Path, line: dict[str, Any]) -> None:
    (root / line["assoc"]["flash"]).unlink()


def _corrupt_frame(root: Path, line: dict[str, Any]) -> None:
    (root / line["assoc"]["angles"][0]).write_bytes(b"garbage")


def _mask_size(root: Path, line: dict[str, Any]) -> None:
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / line["labels"]["card_mask"])


def _box(box: list[float]) -> Callable[[Path, dict[str, Any]], None]:
    def f(root: Path, line: dict[str, Any]) -> None:
        line["labels"]["fields"][0]["box"] = box

    return f


def _doc_type(root: Path, line: dict[str, Any]) -> None:
    line["doc_type"] = "martian_passport"


# kind -> (how to break line 2 of train.jsonl, the field named by `raise`, the reason counted by `skip`)
KINDS: dict[str, tuple[Callable[[Path, dict[str, Any]], None], str, str]] = {
    "corrupt_image": (_corrupt_image, "image", "corrupt_image"),
    "missing_image": (_missing_image, "image", "missing_file"),
    "missing_frame": (_missing_frame, "assoc.flash", "missing_frame"),
    "corrupt_frame": (_corrupt_frame, "assoc.angles[0]", "corrupt_frame"),
    "unknown_class": (_edit_label("tampering", "martian"), "labels.tampering", "unknown_class"),
    "box_outside": (_box([0, 0, 5000, 10]), "labels.fields", "bad_box"),
    "box_negative": (_box([30, 30, 10, 10]), "labels.fields", "bad_box"),
    "mask_size": (_mask_size, "labels.card_mask", "mask_size"),
    "regression_nan": (
        _edit_label("image_quality", float("nan")),
        "labels.image_quality",
        "bad_regression_value",
    ),
    "regression_range": (_edit_label("image_quality", 7.5), "labels.image_quality", "bad_regression_value"),
    "unknown_doc_type": (_doc_type, "doc_type", "unknown_doc_type"),
    "unknown_task": (_edit_label("age_guess", 3), "labels.age_guess", "unknown_task"),
}


def _broken(factory: Callable[..., Path], kind: str) -> Path:
    root = factory(kind, n_train=N_TRAIN, n_val=2, n_test=2)
    lines = _lines(root)
    KINDS[kind][0](root, lines[1])  # line 2: an ald_passport sample with frames and every label
    _write(root, lines)
    return root


def _dm(root: Path, cache: Path, **kw: Any) -> IdDataModule:
    return IdDataModule(
        root=str(root), img_size=(64, 96), batch_size=2, augment=False, preflight_cache_dir=str(cache), **kw
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_sample_raise_and_skip(
    tiny_dataset_factory: Callable[..., Path], tmp_path: Path, kind: str
) -> None:
    root = _broken(tiny_dataset_factory, kind)
    _, field, reason = KINDS[kind]
    # raise: stops in setup, before any training step, naming file, line and field
    with pytest.raises(DataFormatError) as ei:
        _dm(root, tmp_path / "cache", on_error="raise").setup("fit")
    e = ei.value
    assert (Path(e.file or "").name, e.line, e.field) == ("train.jsonl", 2, field), str(e)
    # skip: only that sample is dropped, counted by reason; every other sample loads and batches
    dm = _dm(root, tmp_path / "cache", on_error="skip")
    dm.setup("fit")
    ids = [s.id for s in dm.datasets["train"].samples]
    assert ids == [f"train_{i:03d}" for i in range(N_TRAIN) if i != 1]
    assert dm.skipped == {"train": {reason: 1}}
    seen = [i for b in dm.train_dataloader() for i in b["ids"]]
    assert sorted(seen) == ids


def test_preflight_cache_keyed_by_content(tiny_dataset_factory: Callable[..., Path], tmp_path: Path) -> None:
    root = _broken(tiny_dataset_factory, "unknown_class")
    dm = _dm(root, tmp_path / "cache", on_error="skip")
    cat = dm.catalogue
    first = preflight_scan(root, "train", cat, cache_dir=tmp_path / "cache")
    again = preflight_scan(root, "train", cat, cache_dir=tmp_path / "cache")
    assert not first.cached and again.cached and again.bad_lines == first.bad_lines == {2: "unknown_class"}
    # a changed manifest is a new key: rescanned, and the fix is seen
    lines = _lines(root)
    lines[1]["labels"]["tampering"] = "genuine"
    _write(root, lines)
    fixed = preflight_scan(root, "train", cat, cache_dir=tmp_path / "cache")
    assert not fixed.cached and fixed.problems == []


def test_file_corrupted_after_scan_dropped_at_load(
    tiny_dataset_factory: Callable[..., Path], tmp_path: Path
) -> None:
    root = tiny_dataset_factory("late", n_train=N_TRAIN, n_val=2, n_test=2)
    dm = _dm(root, tmp_path / "cache", on_error="skip")
    dm.setup("fit")
    assert dm.skipped == {}
    _corrupt_image(root, _lines(root)[3])  # after the scan: the cached scan cannot know
    batches = list(dm.train_dataloader())
    seen = sorted(i for b in batches for i in b["ids"])
    assert seen == [f"train_{i:03d}" for i in range(N_TRAIN) if i != 3]
    assert sum(b["skipped"].get("corrupt_image", 0) for b in batches) == 1


def test_skipping_collator_all_dropped(tiny_dataset: Path) -> None:
    ds = IdDataset(tiny_dataset, "val", on_error="skip")
    col = SkippingCollator(ds.catalogue)
    batch = col([{"skipped": "corrupt_image", "id": "a"}, {"skipped": "missing_file", "id": "b"}])
    assert batch["ids"] == [] and batch["skipped"] == {"corrupt_image": 1, "missing_file": 1}
    batch = col([ds[0], {"skipped": "missing_file", "id": "b"}])
    assert batch["image"].shape[0] == 1 and batch["skipped"] == {"missing_file": 1}


def test_path_escape_refused_unless_allowed(
    tiny_dataset_factory: Callable[..., Path], tmp_path: Path
) -> None:
    root = tiny_dataset_factory("esc", n_train=N_TRAIN, n_val=2, n_test=2)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (96, 64), (10, 20, 30)).save(outside)
    lines = _lines(root)
    lines[1]["image"] = "../outside.png"
    _write(root, lines)
    with pytest.raises(DataFormatError, match="escapes the dataset folder") as ei:
        _dm(root, tmp_path / "c", on_error="raise").setup("fit")
    assert (ei.value.line, ei.value.field) == (2, "image")
    with pytest.raises(DataFormatError, match="escapes the dataset folder"):
        IdDataset(root, "train")
    dm = _dm(root, tmp_path / "c", on_error="skip")
    dm.setup("fit")
    assert dm.skipped == {"train": {"escaping_path": 1}}
    # allowed explicitly: the file outside the folder is read
    dm = _dm(root, tmp_path / "c", on_error="raise", allow_external_paths=True)
    dm.setup("fit")
    ds = dm.datasets["train"]
    j = [s.id for s in ds.samples].index("train_001")
    assert ds[j]["image"].shape[-2:] == (64, 96)


def test_decompression_bomb_refused(tiny_dataset_factory: Callable[..., Path], tmp_path: Path) -> None:
    root = tiny_dataset_factory("bomb", n_train=N_TRAIN, n_val=2, n_test=2)
    big = _lines(root)[2]["image"]
    Image.new("RGB", (400, 300)).save(root / big)  # 120000 pixels: a "bomb" under a 100000-pixel limit
    try:
        with pytest.raises(DataFormatError, match="decompression") as ei:
            _dm(root, tmp_path / "c", on_error="raise", max_image_pixels=100_000).setup("fit")
        assert (ei.value.line, ei.value.field) == (3, "image")
        dm = _dm(root, tmp_path / "c", on_error="skip", max_image_pixels=100_000)
        dm.setup("fit")
        assert dm.skipped == {"train": {"image_too_large": 1}}
        # at load time too (e.g. no pre-flight): DataFormatError naming the file, not a PIL warning
        ds = IdDataset(root, "train", max_image_pixels=100_000)
        with pytest.raises(DataFormatError, match=r"train\.jsonl:3: field 'image'.*decompression-bomb guard"):
            ds[2]
    finally:
        Image.MAX_IMAGE_PIXELS = 89_478_485
