"""Recognize: valid JSON whose outputs match the model's predict_step on the DataModule's batch; the CLI; the writer."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from idrecog.callbacks.prediction_writer import JsonlPredictionWriter
from idrecog.cli import main as idrecog_main
from idrecog.data.datamodule import IdDataModule
from idrecog.data.manifest import read_manifest
from idrecog.lit.unified import UnifiedModule
from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.models.interpreter import TaskGuidedInterpreter
from idrecog.recognition.recognizer import RecognitionRequest, Recognizer
from idrecog.recognition.rules import default_rules_path
from idrecog.tasks.catalogue import load_catalogue
from tests.conftest import TINY_SIZE, make_tiny_dataset


def make_tiny_module(img_size: tuple[int, int] = TINY_SIZE, seed: int = 0) -> UnifiedModule:
    """A unified model small enough for CPU tests (1-block ViT of width 32)."""
    torch.manual_seed(seed)
    return UnifiedModule(
        encoder=ViTEncoder("vit_tiny_patch16_224", img_size=img_size, depth=1, embed_dim=32, num_heads=2),
        decoder=TaskDecoder(dim=32, depth=1, num_heads=2),
        interpreter=TaskGuidedInterpreter(guidance_hidden=16),
    ).eval()


def save_checkpoint(module: UnifiedModule, path: Path) -> Path:
    """The two entries ``load_unified`` reads from a Lightning checkpoint."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rec")
    data = make_tiny_dataset(root / "data", n_train=4, n_val=2, n_test=6)
    module = make_tiny_module()
    ckpt = save_checkpoint(module, root / "tiny.ckpt")
    return root, data, module, ckpt


def _requests(data: Path) -> tuple[list[RecognitionRequest], list]:
    samples = read_manifest(data / "test.jsonl", load_catalogue(data / "tasks.yaml"))
    reqs = []
    for s in samples:
        flash = Image.open(data / s.flash).convert("RGB") if s.flash else None
        angles = [Image.open(data / a).convert("RGB") for a in s.angles]
        reqs.append(
            RecognitionRequest(
                image=Image.open(data / s.image).convert("RGB"),
                id=s.id,
                flash=flash,
                angles=angles,
                user=s.user,
                doc_type=s.doc_type,
            )
        )
    return reqs, samples


def _assert_same_output(a: dict, b: dict, where: str) -> None:
    assert set(a) == set(b), where
    for k in a:
        if isinstance(a[k], dict):
            for c in a[k]:
                assert a[k][c] == pytest.approx(b[k][c], abs=1e-5), f"{where}.{k}.{c}"
        elif isinstance(a[k], list) and not all(isinstance(x, dict) for x in a[k] + b[k]):
            assert a[k] == b[k], f"{where}.{k}"  # e.g. mask_size
        elif isinstance(a[k], list):  # boxes
            assert len(a[k]) == len(b[k]), where
            for x, y in zip(a[k], b[k], strict=True):
                assert x["label"] == y["label"] and x["box"] == pytest.approx(y["box"], abs=1e-2), where
        elif isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], abs=1e-5), f"{where}.{k}"
        else:
            assert a[k] == b[k], f"{where}.{k}"


def test_recognize_matches_predict_step_on_the_datamodule_batch(setup):
    root, data, module, ckpt = setup
    dm = IdDataModule(root=str(data), img_size=TINY_SIZE, batch_size=8, predict_split="test", augment=False)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    with torch.inference_mode():
        expected = {p["id"]: p for p in module.predict_step(batch, 0)}

    rec = Recognizer.from_checkpoint(ckpt, rules=default_rules_path(), out_dir=root / "out")
    reqs, samples = _requests(data)
    records = rec.recognize(reqs)
    assert [r["id"] for r in records] == [s.id for s in samples]
    for r, s in zip(records, samples, strict=True):
        json.loads(json.dumps(r))  # JSON-able
        exp = expected[s.id]
        if s.doc_type is not None:
            assert r["tasks"]["how"] == "doc_type given"
            assert r["tasks"]["resolved"] == rec.catalogue.tasks_for(s.doc_type)
            assert set(r["outputs"]) == set(exp["outputs"])
            assert r["withheld"] == exp["withheld"]
        else:  # no doc type: resolved by the model's own doc-type classifier, a subset of all tasks
            assert r["tasks"]["how"] in ("doc_type predicted", "all")
            assert set(r["outputs"]) <= set(exp["outputs"])
        for task, out in r["outputs"].items():
            ref = dict(exp["outputs"][task])
            mask = ref.pop("mask", None)
            if mask is not None:
                written = np.asarray(Image.open(out["mask"]))
                np.testing.assert_array_equal(written, mask)
                assert out["mask_size"] == list(mask.shape)
                out = {k: v for k, v in out.items() if k not in ("mask", "mask_size")}
            _assert_same_output(out, ref, f"{s.id}.{task}")
        assert set(r["routing"]) == set(r["tasks"]["resolved"])
        for task in r["outputs"]:
            assert r["routing"][task]["routed"] is True
        assert r["recognition"]["decision"] in ("accept", "review", "reject")
        names = {x["rule"] for x in r["recognition"]["reasons"]} | set(r["recognition"]["passed"])
        names |= {x["rule"] for x in r["recognition"]["skipped"]}
        assert names == {rule.name for rule in rec.rules.rules}


def test_one_forward_pass_per_batch(setup):
    _, data, _, ckpt = setup
    rec = Recognizer.from_checkpoint(ckpt, batch_size=4)
    calls = []
    rec.module.model.encoder.register_forward_hook(lambda *a: calls.append(1))
    reqs, _ = _requests(data)
    rec.recognize(reqs)  # 6 images, batches of 4 -> 2 encoder passes for every task
    assert len(calls) == 2


def test_recognize_command_prints_one_json_per_image(setup, capsys):
    root, data, _, ckpt = setup
    images = sorted(str(p) for p in (data / "images").glob("test_00[0-2].*"))
    out_dir = root / "cli_out"
    code = idrecog_main(
        ["recognize", *images, "--ckpt_path", str(ckpt), "--doc-type", "brv_id_card", "--out", str(out_dir)]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["image"] for x in lines] == images
    for x in lines:
        assert x["tasks"] == {
            "resolved": load_catalogue(data / "tasks.yaml").tasks_for("brv_id_card"),
            "how": "doc_type given",
        }
        assert "hologram" not in x["routing"]  # BRV id cards have no hologram task
        assert x["recognition"]["decision"] in ("accept", "review", "reject")
        if "card_mask" in x["outputs"]:
            assert Path(x["outputs"]["card_mask"]["mask"]).is_file()


def test_recognize_command_errors_are_one_line(setup, capsys):
    _, data, _, ckpt = setup
    assert idrecog_main(["recognize", "/nonexistent.png", "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent.png" in err and "image not found" in err and len(err.strip().splitlines()) == 1
    image = str(next((data / "images").glob("test_000.*")))
    assert idrecog_main(["recognize", image, "--ckpt_path", str(ckpt), "--doc-type", "martian_passport"]) == 2
    assert "unknown doc type 'martian_passport'" in capsys.readouterr().err


def test_prediction_writer_writes_the_same_objects(setup):
    root, data, module, _ = setup
    out_dir = root / "pred"
    writer = JsonlPredictionWriter(str(out_dir), write_overlays=True, rules=str(default_rules_path()))
    dm = IdDataModule(root=str(data), img_size=TINY_SIZE, batch_size=4, predict_split="test", augment=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[writer],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(module, datamodule=dm, return_predictions=False)
    lines = [json.loads(x) for x in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    rec = Recognizer(module, rules=default_rules_path(), out_dir=root / "rec_out")
    reqs, _ = _requests(data)
    by_id = {r["id"]: r for r in rec.recognize(reqs)}
    for x in lines:
        assert Path(x["overlay"]).is_file()
        r = by_id[x["id"]]
        assert x["tasks"] == r["tasks"] or r["tasks"]["how"] != "doc_type given"
        assert (
            x["recognition"]["decision"] == r["recognition"]["decision"]
            or r["tasks"]["how"] != "doc_type given"
        )
        for task in set(x["outputs"]) & set(r["outputs"]):
            a = {k: v for k, v in x["outputs"][task].items() if k != "mask"}
            b = {k: v for k, v in r["outputs"][task].items() if k != "mask"}
            _assert_same_output(a, b, f"{x['id']}.{task}")
