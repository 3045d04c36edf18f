"""Export: one ONNX / TorchScript artefact with dynamic batch and named per-task outputs; onnxruntime parity."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from idrecog.cli import main as idrecog_main
from idrecog.recognition.export import ExportModule, export_model
from tests.test_recognize import make_tiny_module, save_checkpoint

# classification logits and regression values: 1e-4 absolute (the bar); dense and box outputs: looser
TOL = {
    "logits": 1e-4,
    "value": 1e-4,
    "gate_logits": 1e-4,
    "open_logits": 1e-4,
    "mask_logits": 1e-3,
    "boxes": 1e-3,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export")
    module = make_tiny_module()
    path = root / "model.onnx"
    info = export_model(module, path, "onnx")
    return module, path, info


def test_onnx_outputs_are_named_per_task(exported):
    module, path, info = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == info["outputs"]
    for task in module.catalogue.names:
        assert f"{task}.gate_logits" in names
    assert {"doc_type.logits", "image_quality.value", "card_mask.mask_logits", "fields.boxes"} <= set(names)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["idrecog.catalogue"]) == module.catalogue.to_dict()
    assert json.loads(meta["idrecog.img_size"]) == list(module.model.encoder.img_size)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_parity_with_pytorch_at_any_batch(exported, batch):
    module, path, _ = exported
    h, w = module.model.encoder.img_size
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        ref = ExportModule(module.model).eval()(images)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": images.numpy()})
    names = [o.name for o in sess.get_outputs()]
    for name, g, r in zip(names, got, ref, strict=True):
        assert g.shape[0] == batch and tuple(g.shape) == tuple(r.shape), name
        tol = TOL[name.split(".", 1)[1]]
        assert (torch.from_numpy(g) - r).abs().max().item() <= tol, name
    # the same decisions: classes and mask pixels
    for name, g, r in zip(names, got, ref, strict=True):
        if name.endswith(".logits") and r.dim() == 2:
            assert torch.equal(torch.from_numpy(g).argmax(-1), r.argmax(-1)), name
        if name.endswith(".mask_logits"):
            agree = (torch.from_numpy(g).argmax(1) == r.argmax(1)).float().mean().item()
            assert agree > 0.999, name


def test_torchscript_export_and_cli(tmp_path: Path, capsys):
    module = make_tiny_module(seed=1)
    ckpt = save_checkpoint(module, tmp_path / "m.ckpt")
    out = tmp_path / "model.pt"
    assert (
        idrecog_main(["export", "--ckpt_path", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    )
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    files = {"output_names.json": ""}
    ts = torch.jit.load(str(out), _extra_files=files)
    assert json.loads(files["output_names.json"]) == info["outputs"]
    h, w = module.model.encoder.img_size
    images = torch.randn(2, 3, h, w)
    with torch.no_grad():
        ref = ExportModule(module.model).eval()(images)
        got = ts(images)
    for name, g, r in zip(info["outputs"], got, ref, strict=True):
        assert torch.allclose(g, r, atol=1e-5), name


def test_export_cli_onnx_reports_parity(tmp_path: Path, capsys):
    ckpt = save_checkpoint(make_tiny_module(seed=2), tmp_path / "m.ckpt")
    out = tmp_path / "m.onnx"
    assert idrecog_main(["export", "--ckpt_path", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.is_file() and info["max_abs_diff"] < 1e-3
    with pytest.raises(SystemExit) as ei:  # the argument parser's usage error
        idrecog_main(["export", "--ckpt_path", str(ckpt), "--format", "tflite", "--out", str(out)])
    assert ei.value.code == 2


def test_export_without_the_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):  # as if `pip install idrecog` without [export]
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "m.onnx"
    args = ["export", "--ckpt_path", str(tmp_path / "not-read.ckpt"), "--out", str(out)]
    assert idrecog_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'idrecog[export]'" in err[0] and "onnx" in err[0], err
    assert not out.exists()
    # TorchScript needs no extra
    ckpt = save_checkpoint(make_tiny_module(seed=3), tmp_path / "m.ckpt")
    ts = ["export", "--ckpt_path", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]
    assert idrecog_main(ts) == 0
