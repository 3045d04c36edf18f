"""The synthetic benchmark generator: format, determinism, label/pixel agreement, MRZ, frames, arguments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from idrecog.cli import main as idrecog_main
from idrecog.data.manifest import SPLITS, read_manifest
from idrecog.errors import ConfigError
from idrecog.synth import mrz
from idrecog.synth.generate import doc_type_of, generate_dataset, render_sample
from idrecog.tasks.catalogue import default_catalogue

SMALL = dict(train=12, val=4, test=4, seed=3, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "d1", workers=1, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_icao_check_digit_specimens() -> None:
    assert mrz.check_digit("L898902C3") == "6"
    assert mrz.check_digit("740812") == "2"
    assert mrz.validate_td3(
        "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<", "L898902C36UTO7408122F1204159ZE184226B<<<<<10"
    )
    assert not mrz.validate_td3(
        "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<", "L898902C37UTO7408122F1204159ZE184226B<<<<<10"
    )
    assert mrz.validate_td1(
        "I<UTOD231458907<<<<<<<<<<<<<<<", "7408122F1204159UTO<<<<<<<<<<<6", "ERIKSSON<<ANNA<MARIA<<<<<<<<<<"
    )


def test_generated_mrz_lines_are_valid() -> None:
    seen = set()
    for i in range(14):
        r = render_sample(5, "val", i)
        if r["mrz"] is None:
            continue
        lines = r["mrz"]
        seen.add(len(lines))
        assert (mrz.validate_td3 if len(lines) == 2 else mrz.validate_td1)(*lines), lines
    assert seen == {2, 3}  # both passports (TD3) and cards (TD1) were drawn


def test_layout_and_every_manifest_line_parses(dataset: Path) -> None:
    assert yaml.safe_load((dataset / "tasks.yaml").read_text()) == default_catalogue().to_dict()
    cat = default_catalogue()
    total = 0
    for split in SPLITS:
        samples = read_manifest(dataset / f"{split}.jsonl", cat)
        assert len(samples) == SMALL[split]
        total += len(samples)
        for s in samples:
            assert (dataset / s.image).is_file()
            assert set(s.labels) <= set(cat.tasks_for(s.doc_type))
            if s.labels.get("card_mask"):
                with Image.open(dataset / s.labels["card_mask"]) as m, Image.open(dataset / s.image) as im:
                    assert m.mode == "L" and m.size == im.size == (256, 160)
                    assert np.asarray(m).max() <= 3
            if "hologram" in cat.tasks_for(s.doc_type):
                assert s.flash and len(s.angles) >= 2
                assert all((dataset / p).is_file() for p in [s.flash, *s.angles])
            else:
                assert not s.assoc
            if s.labels.get("visibility") == "none":
                assert s.labels.get("doc_type") is None and s.doc_type is not None
            assert s.user["attributes"]["age_band"] in ("18-25", "26-40", "41-60", "60+")
    assert not list(dataset.parent.glob(".d1.tmp-*"))  # the temporary folder was renamed into place
    assert total == 20


def test_same_bytes_for_same_seed_and_any_workers(dataset: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "d2", workers=2, **SMALL)
    a, b = _files(dataset), _files(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    other = render_sample(SMALL["seed"] + 1, "train", 0)["image"]
    assert (
        np.asarray(other).tobytes() != np.asarray(render_sample(SMALL["seed"], "train", 0)["image"]).tobytes()
    )


def test_masks_and_boxes_agree_with_geometry() -> None:
    checked_full = 0
    for i in range(24):
        r = render_sample(11, "test", i)
        m = np.asarray(r["mask"])
        boxes = {f["label"]: f["box"] for f in r["labels"]["fields"]}
        for b in boxes.values():
            assert 0 <= b[0] < b[2] <= 256 and 0 <= b[1] < b[3] <= 160
        for label, cls in (("portrait", 2), ("mrz", 3)):
            ys, xs = np.nonzero(m == cls)
            if label in boxes and len(xs):
                x0, y0, x1, y1 = boxes[label]
                assert (
                    xs.min() >= x0 - 1.5
                    and xs.max() <= x1 + 0.5
                    and ys.min() >= y0 - 1.5
                    and ys.max() <= y1 + 0.5
                )
            if label in boxes and r["labels"]["visibility"] == "full" and len(xs):
                # the box is the bounding box of that class's pixels
                x0, y0, x1, y1 = boxes[label]
                inter = (min(x1, xs.max() + 1) - max(x0, xs.min())) * (
                    min(y1, ys.max() + 1) - max(y0, ys.min())
                )
                union = (x1 - x0) * (y1 - y0) + (np.ptp(xs) + 1) * (np.ptp(ys) + 1) - inter
                assert inter / union > 0.85
        if r["labels"]["visibility"] == "full":
            checked_full += 1
            for b in boxes.values():
                x0, y0, x1, y1 = (round(v) for v in b)
                # boxes lie on the document (a turned card's axis-aligned box takes in some of its surroundings)
                assert (m[y0:y1, x0:x1] > 0).mean() > 0.7
            assert (m == 0).any() and (m > 0).any()
        if r["labels"]["visibility"] == "none":
            assert (m > 0).mean() < 0.3
    assert checked_full >= 8


def _holo_features(r: dict) -> tuple[np.ndarray, np.ndarray]:
    """Colour statistics of the hologram in the main image (single), and how its hue turns between the two angle
    frames, each frame read at the hologram's own place in it (multi: exposure changes do not move hue)."""
    box = next(f["box"] for f in r["labels"]["fields"] if f["label"] == "hologram")

    def crop(im: Image.Image, b: list[float]) -> np.ndarray:
        x0, y0, x1, y1 = (round(v) for v in b)
        return np.asarray(im.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))), np.float32)

    def hue(im: Image.Image, b: list[float]) -> float:
        hsv = crop(im.convert("HSV"), b)
        return float(np.angle((hsv[..., 1] * np.exp(2j * np.pi * hsv[..., 0] / 255)).sum()))

    boxes = [b or box for b in r["frame_hologram_boxes"]]  # flash, angles...
    main = crop(r["image"], box).reshape(-1, 3)
    turns = [hue(a, b) for a, b in zip(r["frames"]["angles"], boxes[1:], strict=True)]
    single = np.r_[main.mean(0), main.std(0)]
    multi = np.r_[abs(np.angle(np.exp(1j * (turns[0] - turns[1]))))]
    return single, multi


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray, n_train: int) -> float:
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    z = (x - mu) / sd
    cents = np.stack([z[:n_train][y[:n_train] == c].mean(0) for c in (0, 1)])
    pred = np.argmin(((z[n_train:, None] - cents[None]) ** 2).sum(-1), 1)
    return float((pred == y[n_train:]).mean())


def test_hologram_class_shows_in_the_frames_not_in_the_main_image() -> None:
    """Read where the hologram lies in each hand-held frame, the frames tell genuine from counterfeit."""
    holo_types = {"ald_id_card", "ald_passport", "cst_residence_permit"}
    singles, multis, ys = [], [], []
    i = 0
    while len(ys) < 90 and i < 400:
        if doc_type_of(7, "train", i) in holo_types:
            r = render_sample(7, "train", i)
            if r["labels"].get("hologram") is not None:
                s, m = _holo_features(r)
                singles.append(s)
                multis.append(m)
                ys.append(r["labels"]["hologram"] == "genuine")
        i += 1
    y = np.array(ys, int)
    assert 0.3 < y.mean() < 0.7
    n_train = 50
    acc_single = _nearest_centroid_accuracy(np.array(singles), y, n_train)
    acc_multi = _nearest_centroid_accuracy(np.array(multis), y, n_train)
    assert acc_single < 0.65, acc_single
    assert acc_multi >= 0.85, acc_multi


def _frame_difference(r: dict) -> float:
    """The pixel-difference input of a registered-frames design: how much the angle frames differ where they
    differ most (top 1% of pixels, after a light blur against noise)."""
    from PIL import ImageFilter

    a, b = (np.asarray(f.filter(ImageFilter.GaussianBlur(1.5)), np.float32) for f in r["frames"]["angles"])
    d = np.abs(a - b).sum(-1).ravel()
    return float(np.sort(d)[-max(1, d.size // 100) :].mean())


def test_hand_held_frames_defeat_a_pixel_difference() -> None:
    """Registered frames let a pixel difference find the genuine hologram; hand-held frames (each with its own
    pose and exposure) make it fire on every capture, so alone it is near chance."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    auc = {}
    for mode in ("registered", "handheld"):
        x, y, i = [], [], 0
        while len(y) < 40:
            r = render_sample(3, "val", i, frames=mode)
            i += 1
            if r["frames"] and r["labels"].get("hologram") is not None:
                x.append(_frame_difference(r))
                y.append(r["labels"]["hologram"] == "genuine")
        auc[mode] = float(binary_auroc(torch.tensor(x), torch.tensor(y).long()))
    assert auc["registered"] > 0.75 and abs(auc["handheld"] - 0.5) < 0.15, auc


def _screen_cue(im: Image.Image) -> float:
    """Crude screen-replay statistics: lifted blacks, a blue cast, and the energy of periods 3-5 px (moiré)."""
    a = np.asarray(im, np.float32)
    g = a.mean(-1) - a.mean()
    f = np.abs(np.fft.fft2(g))
    r = np.hypot(np.fft.fftfreq(g.shape[0])[:, None], np.fft.fftfreq(g.shape[1])[None, :])
    moire = f[(r > 0.18) & (r < 0.36)].sum() / f[r > 0.02].sum()
    return float(np.percentile(a.mean(-1), 3) / 40 + (a[..., 2] - a[..., 0]).mean() / 20 + 10 * moire)


def _behaviour_risk(user: dict) -> float:
    b = user["behaviour"]
    return b["attempts"] / 3 + min(b["device_changes"], 1) + max(0.0, 2 - float(np.log(b["seconds"])))


def test_presentation_attacks_show_partly_in_the_image_partly_in_the_behaviour() -> None:
    """Screen replays show in the image and behave like bona fide sessions; injections look clean and show in the
    behaviour: each input alone misses half the attacks, together they find most (the task needs both)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    attack, image, beh = [], [], []
    for i in range(160):
        r = render_sample(5, "test", i)
        attack.append(r["attack"])
        image.append(_screen_cue(r["image"]))
        beh.append(_behaviour_risk(r["user"]))
        assert r["labels"]["presentation_attack"] == ("bona_fide" if r["attack"] is None else "attack")
    kind = np.array([a or "bona_fide" for a in attack])
    img, bh = np.array(image), np.array(beh)

    def auc(x: np.ndarray, positive: np.ndarray, among: np.ndarray) -> float:
        return float(binary_auroc(torch.tensor(x[among]), torch.tensor(positive[among]).long()))

    bona, replay, inject = kind == "bona_fide", kind == "screen_replay", kind == "injection"
    everyone = np.ones_like(bona)
    assert 0.2 < (~bona).mean() < 0.4 and replay.sum() >= 10 and inject.sum() >= 10
    assert auc(img, replay, bona | replay) > 0.75  # replays show in the image...
    assert auc(bh, replay, bona | replay) < 0.7  # ...not in the behaviour
    assert auc(bh, inject, bona | inject) > 0.9  # injections show in the behaviour...
    assert auc(img, inject, bona | inject) < 0.7  # ...not in the image
    z = lambda v: (v - v[bona].mean()) / v[bona].std()  # noqa: E731
    both = auc(np.maximum(z(img), z(bh)), ~bona, everyone)
    assert both > max(auc(img, ~bona, everyone), auc(bh, ~bona, everyone)) + 0.05


def test_drop_doc_type_and_missing_fraction(tmp_path: Path) -> None:
    out = generate_dataset(
        tmp_path / "d", train=6, val=3, test=0, drop_doc_type=1.0, missing_fraction=1.0, progress=False
    )
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "val.jsonl").read_text().splitlines()]
    assert all("doc_type" not in s for s in train)
    assert all("doc_type" in s for s in val)
    for s in train + val:
        # everything is blanked except a determinable doc_type
        assert all(v is None for k, v in s["labels"].items() if k != "doc_type")
        if s["labels"]["doc_type"] is not None:
            assert s["labels"]["doc_type"] in default_catalogue()["doc_type"].classes
    assert any(s["labels"]["doc_type"] is not None for s in train)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(train=-1),
        dict(val=-2),
        dict(height=0),
        dict(width=-5),
        dict(missing_fraction=1.5),
        dict(drop_doc_type=-0.1),
        dict(workers=0),
    ],
)
def test_bad_arguments_rejected(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        generate_dataset(tmp_path / "d", progress=False, **{"train": 1, "val": 0, "test": 0, **kwargs})
    assert not (tmp_path / "d").exists()


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--train", "-1"], ["--missing-fraction", "2"], ["--height", "0"], ["--train", "abc"]):
        assert idrecog_main(["synth", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("idrecog synth: error:") and err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        idrecog_main(["synth", "--out", str(blocker / "sub"), "--train", "1", "--val", "0", "--test", "0"])
        == 2
    )
    assert (
        idrecog_main(
            [
                "synth",
                "--out",
                str(tmp_path / "ok"),
                "--train",
                "2",
                "--val",
                "1",
                "--test",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert len((tmp_path / "ok" / "train.jsonl").read_text().splitlines()) == 2


def test_non_empty_out_needs_overwrite_and_is_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="overwrite"):
        generate_dataset(out, train=2, val=0, test=0, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left behind
    generate_dataset(out, train=2, val=0, test=0, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "train.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_label_distributions_are_spread() -> None:
    labels = [render_sample(1, "val", i)["labels"] for i in range(40)]
    q = np.array([lab["image_quality"] for lab in labels])
    assert q.min() < 0.5 < q.max() and q.std() > 0.12
    tamper = [lab["tampering"] for lab in labels if lab.get("tampering")]
    assert {"genuine", "portrait_swap", "text_edit"} <= set(tamper) or len(tamper) < 20
    assert {lab["visibility"] for lab in labels} >= {"full", "partial"}
