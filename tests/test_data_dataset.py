"""IdDataset items and collated batches follow the batch contract on the hand-made fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from idrecog.data.collate import collate_samples
from idrecog.data.dataset import IdDataset
from idrecog.data.resolution import DocTypeResolver
from idrecog.data.transforms import build_transforms
from idrecog.errors import DataFormatError
from idrecog.tasks.segmentation import IGNORE_INDEX


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_items_follow_contract(tiny_dataset: Path) -> None:
    ds = IdDataset(tiny_dataset, "train", transform=build_transforms("test", (64, 96), augment=False))
    cat = ds.catalogue
    manifest = _lines(tiny_dataset / "train.jsonl")
    assert len(ds) == len(manifest)
    for i, item in enumerate(ds):
        line = manifest[i]
        assert isinstance(item["image"], tv_tensors.Image)
        assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == (3, 64, 96)
        assert item["applies"].dtype == torch.bool and item["applies"].shape == (len(cat),)
        applying = set(cat.tasks_for(line.get("doc_type")))
        for j, spec in enumerate(cat):
            assert bool(item["applies"][j]) == (spec.name in applying)
            has_label = line["labels"].get(spec.name) is not None
            if not item["applies"][j] or not has_label:
                assert not item["present"][j] and item["targets"][spec.name] is None
        # present implies applies, and every present task has a target
        assert not (item["present"] & ~item["applies"]).any()
        assert all(item["targets"][s.name] is not None for j, s in enumerate(cat) if item["present"][j])
        assert item["id"] == line["id"] and item["doc_type"] == line.get("doc_type")


def test_null_labels_and_missing_side_info_are_masked(tiny_dataset: Path) -> None:
    ds = IdDataset(tiny_dataset, "train")
    idx = {n: ds.catalogue.index(n) for n in ds.catalogue.names}
    it1 = ds[1]  # tampering and image_quality null
    assert it1["applies"][idx["tampering"]] and not it1["present"][idx["tampering"]]
    assert not it1["present"][idx["image_quality"]] and it1["present"][idx["doc_type"]]
    it4 = ds[4]  # nationality_match labelled, no user info
    assert it4["applies"][idx["nationality_match"]] and not it4["present"][idx["nationality_match"]]
    it7 = ds[7]  # hologram labelled, no frames in the manifest
    assert it7["frames_missing"][idx["hologram"]] and not it7["present"][idx["hologram"]]
    assert ds.counts["frames_missing/hologram"] == 1 and ds.counts["user_missing/nationality_match"] == 1
    assert ds.manifest_missing_frames() == {"hologram": 1}


def test_batch_follows_contract(tiny_dataset: Path) -> None:
    ds = IdDataset(tiny_dataset, "train", transform=build_transforms("fit", (64, 96), augment=True))
    items = [ds[i] for i in range(6)]
    b = collate_samples(items, ds.catalogue)
    n, t = 6, len(ds.catalogue)
    assert b["image"].shape == (n, 3, 64, 96) and type(b["image"]) is torch.Tensor
    assert b["applies"].shape == b["present"].shape == (n, t) and b["present"].dtype == torch.bool
    assert set(b["targets"]) == set(ds.catalogue.names)
    assert b["targets"]["tampering"].dtype == torch.long and b["targets"]["tampering"][1] == -1
    assert torch.isnan(b["targets"]["image_quality"][1]) and not torch.isnan(b["targets"]["image_quality"][0])
    seg = b["targets"]["card_mask"]
    assert seg.shape == (n, 64, 96) and seg.dtype == torch.long and (seg[2] == IGNORE_INDEX).all()
    fields = b["targets"]["fields"]
    assert (
        len(fields) == n
        and fields[0]["boxes"].shape[1] == 4
        and len(fields[0]["boxes"]) == len(fields[0]["labels"])
    )
    assert b["ids"] == [f"train_{i:03d}" for i in range(6)] and b["doc_type"][0] == "ald_id_card"
    # frames: samples 0, 1, 5 carry flash + 2 angles; the others have no frame slot filled
    a = b["assoc"]
    assert (
        a["flash"].shape == (n, 3, 64, 96)
        and a["angles"].shape == (n, 2, 3, 64, 96)
        and a["mask"].shape == (n, 3)
    )
    assert a["mask"][[0, 1, 5]].all() and not a["mask"][[2, 3, 4]].any()
    u = b["user"]
    assert u["attributes"].dtype == torch.long and u["attributes"].shape[0] == n
    assert u["mask"].tolist() == [True, True, True, False, False, True]
    assert u["behaviour"].shape == u["behaviour_mask"].shape and u["behaviour_mask"].dtype == torch.bool
    assert (u["behaviour"][~u["behaviour_mask"]] == 0).all()


def test_a_task_that_requires_the_declared_details_is_masked_without_them(tiny_dataset: Path) -> None:
    """nationality_match requires ``user.attributes``: a session that recorded behaviour but no declared details
    has the label masked at load and left out of the class counts, like a session with no user info at all."""
    path = tiny_dataset / "train.jsonl"
    lines = _lines(path)
    i = next(k for k, x in enumerate(lines) if x["labels"].get("nationality_match") and x.get("user"))
    del lines[i]["user"]["attributes"]
    _write(path, lines)
    ds = IdDataset(tiny_dataset, "train")
    j = ds.catalogue.index("nationality_match")
    assert ds.catalogue["nationality_match"].required_user_parts == ("attributes",)
    item = ds[i]
    assert item["applies"][j] and not item["present"][j] and item["targets"]["nationality_match"] is None
    assert ds.counts["user_missing/nationality_match"] == 1
    labelled = [
        x for x in lines if x["labels"].get("nationality_match") and (x.get("user") or {}).get("attributes")
    ]
    assert sum(ds.label_counts()["nationality_match"].values()) == len(labelled)


def _record_loads(monkeypatch) -> list[str]:
    """Spy on ``IdDataset._load_image``: the returned list collects every relative path it decodes."""
    opened: list[str] = []
    orig = IdDataset._load_image

    def spy(self, rel, *args):
        opened.append(rel)
        return orig(self, rel, *args)

    monkeypatch.setattr(IdDataset, "_load_image", spy)
    return opened


def test_frames_not_loaded_when_no_applying_task_uses_them(tiny_dataset: Path, monkeypatch) -> None:
    manifest = tiny_dataset / "train.jsonl"
    lines = _lines(manifest)
    # line 3 (brv_id_card: no hologram task) lists frames that do not exist: they must not be touched
    lines[2]["assoc"] = {"flash": "frames/nope.png", "angles": ["frames/nope_a.png"]}
    _write(manifest, lines)
    ds = IdDataset(tiny_dataset, "train")
    opened = _record_loads(monkeypatch)
    item = ds[2]
    assert "assoc" not in item and opened == [lines[2]["image"]]
    opened.clear()
    assert "assoc" in ds[0] and len(opened) == 4  # image, flash, 2 angles


def test_load_frames_off_opens_no_frame_and_masks_by_the_manifest(tiny_dataset: Path, monkeypatch) -> None:
    # a model that reads no frames: nothing but the image is decoded, and a multi-frame label is masked exactly
    # where the frame-reading path would mask it for want of frames in the manifest (same labelled set)
    ds = IdDataset(tiny_dataset, "train", load_frames=False)
    opened = _record_loads(monkeypatch)
    j = ds.catalogue.index("hologram")
    item = ds[0]
    assert "assoc" not in item and opened == [ds.samples[0].image]
    assert item["present"][j] and not item["frames_missing"][j]
    loading = IdDataset(tiny_dataset, "train")
    for i in range(len(ds)):  # train line 8 is labelled but lists no frames: masked both ways
        a, b = ds[i], loading[i]
        assert torch.equal(a["present"], b["present"]) and torch.equal(
            a["frames_missing"], b["frames_missing"]
        )
    assert ds[7]["frames_missing"][j] and not ds[7]["present"][j]


def test_frames_share_the_geometric_transform(tiny_dataset: Path) -> None:
    # make sample 0's flash frame a copy of its image: after augmentation both must still be identical
    shutil.copy(tiny_dataset / "images" / "train_000.png", tiny_dataset / "frames" / "train_000_flash.png")
    ds = IdDataset(tiny_dataset, "train", transform=build_transforms("fit", (64, 96), augment=True))
    plain = IdDataset(tiny_dataset, "train", transform=build_transforms("test", (64, 96), augment=False))[0]
    for seed in range(3):
        torch.manual_seed(seed)
        item = ds[0]
        assert not torch.allclose(item["image"], plain["image"])  # the augmentation did something
        torch.testing.assert_close(item["assoc"]["flash"], item["image"])


def test_load_errors_name_file_line_and_field(tiny_dataset: Path) -> None:
    (tiny_dataset / "images" / "train_001.jpg").write_bytes(b"not an image")
    (tiny_dataset / "images" / "train_002.png").unlink()
    from PIL import Image

    Image.new("L", (10, 10)).save(tiny_dataset / "masks" / "train_003.png")
    ds = IdDataset(tiny_dataset, "train")
    src = str(tiny_dataset / "train.jsonl")
    for index, field in [(1, "image"), (2, "image"), (3, "labels.card_mask")]:
        with pytest.raises(DataFormatError) as e:
            ds[index]
        assert (e.value.file, e.value.line, e.value.field) == (src, index + 1, field)
    # on_error="mask": the bad mask is masked and counted, the sample still loads
    ds = IdDataset(tiny_dataset, "train", on_error="mask")
    item = ds[3]
    assert not item["present"][ds.catalogue.index("card_mask")] and ds.counts["load_error/card_mask"] == 1


def test_missing_frame_file_masks_the_label(tiny_dataset: Path) -> None:
    for k in ("flash", "a0", "a1"):
        (tiny_dataset / "frames" / f"train_000_{k}.png").unlink()
    ds = IdDataset(tiny_dataset, "train")
    item = ds[0]
    j = ds.catalogue.index("hologram")
    assert item["frames_missing"][j] and not item["present"][j] and item["assoc"]["flash"] is None
    b = collate_samples([item, ds[1]], ds.catalogue)
    assert b["assoc"]["mask"].tolist() == [[False, False, False], [True, True, True]]


def test_skip_resolver_drops_samples_without_doc_type(tiny_dataset: Path) -> None:
    full = IdDataset(tiny_dataset, "val")
    ds = IdDataset(tiny_dataset, "val", resolver=DocTypeResolver(full.catalogue, missing="skip"))
    assert len(ds) == len(full) - 1 and ds.n_dropped == 1
    assert all(s.doc_type is not None for s in ds.samples)


def test_cache_images_decodes_each_file_once(tiny_dataset: Path, monkeypatch) -> None:
    import idrecog.data.dataset as dataset_mod

    calls: list[Path] = []
    orig = dataset_mod.read_rgb

    def counting(path: Path):
        calls.append(path)
        return orig(path)

    monkeypatch.setattr(dataset_mod, "read_rgb", counting)
    ds = IdDataset(tiny_dataset, "train", cache_images=True)
    first = ds[0]
    n = len(calls)
    assert n == 4  # image, flash, two angles
    second = ds[0]
    assert len(calls) == n
    torch.testing.assert_close(first["image"], second["image"])
    # the cached tensor is not modified in place by the transform
    torch.testing.assert_close(ds[0]["image"], first["image"])
