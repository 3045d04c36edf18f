"""A task type defined outside idrecog (tests/plugins/ordinal_task.py) works by its registered name, from an
import or an entry point of its distribution; a catalogue or checkpoint naming a module is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from idrecog.data.manifest import read_manifest
from idrecog.errors import ConfigError, DataFormatError
from idrecog.tasks import (
    HeadContext,
    create_task_type,
    get_task_type_class,
    list_task_types,
    register_task_type,
)
from idrecog.tasks.catalogue import load_catalogue
from idrecog.tasks.classification import Classification

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PATH_NAME = "tests.plugins.ordinal_task:Ordinal"


def _write_catalogue(root: Path, type_name: str) -> Path:
    data = {
        "tasks": [
            {"name": "doc_type", "type": "classification", "classes": ["id_card", "passport"]},
            {"name": "wear", "type": type_name, "classes": ["new", "worn", "damaged"], "options": {"x": 1}},
        ]
    }
    path = root / "tasks.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _write_manifest(root: Path, wear: list[str | None]) -> Path:
    path = root / "train.jsonl"
    lines = [
        json.dumps({"id": f"s{i}", "image": f"s{i}.png", "labels": {"doc_type": "passport", "wear": w}})
        for i, w in enumerate(wear)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train_step(task) -> None:
    head = task.build_head(8)
    out = head(torch.randn(3, task.num_queries, 8), HeadContext(pixel_feats=None, image_size=(16, 16)))
    targets = task.collate([0, None, 2], (16, 16))
    loss = task.loss(out, targets, torch.tensor([True, False, True]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in head.parameters())


def test_registered_name_after_import(tmp_path: Path) -> None:
    import tests.plugins.ordinal_task as plugin

    assert "ordinal" in list_task_types()
    assert get_task_type_class("ordinal") is plugin.Ordinal
    cat = load_catalogue(_write_catalogue(tmp_path, "ordinal"))
    task = create_task_type(cat["wear"])
    assert isinstance(task, plugin.Ordinal) and task.options == {"x": 1}
    assert task.load_target("damaged", tmp_path, (16, 16)) == 2
    _train_step(task)

    samples = read_manifest(_write_manifest(tmp_path, ["worn", None]), cat)
    assert [s.labels["wear"] for s in samples] == ["worn", None]
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: field 'labels\.wear'"):
        read_manifest(_write_manifest(tmp_path, ["worn", "shiny"]), cat)


def write_entry_point(site: Path, name: str, target: str = PATH_NAME) -> None:
    """A distribution's metadata on ``site`` declaring ``name`` in group ``idrecog.task_types`` (what pip writes
    when a package declares the entry point in its pyproject.toml)."""
    dist = site / "idrecog_ordinal_plugin-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: idrecog-ordinal-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[idrecog.task_types]\n{name} = {target}\n")


def test_entry_point_registers_the_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from idrecog.tasks.registry import TASK_TYPES

    write_entry_point(tmp_path / "site", "ordinal_from_ep")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(TASK_TYPES, "_entry_points_loaded", False)
    cat = load_catalogue(_write_catalogue(tmp_path, "ordinal_from_ep"))
    task = create_task_type(cat["wear"])
    assert type(task).__name__ == "Ordinal" and type(task).type_name == "ordinal"
    assert "ordinal_from_ep" in list_task_types()
    _train_step(task)


@pytest.mark.parametrize("path", [PATH_NAME, "os:system", "subprocess.Popen"])
def test_a_catalogue_naming_a_module_is_refused(tmp_path: Path, path: str) -> None:
    import sys

    before = set(sys.modules)
    with pytest.raises(DataFormatError, match=r"type'.*never imports a module named by a config") as e:
        load_catalogue(_write_catalogue(tmp_path, path))
    assert "\n" not in str(e.value) and path in str(e.value)
    assert "tests.plugins.ordinal_task" not in set(sys.modules) - before  # nothing was imported


def test_a_checkpoint_naming_a_module_is_refused(tmp_path: Path) -> None:
    """The catalogue stored in a checkpoint goes through the same table: a module path in it is refused before
    any weight is read."""
    from idrecog.lit.unified import UnifiedModule, load_unified
    from tests.test_model_fakes import fake_catalogue, tiny_parts

    module = UnifiedModule(catalogue=fake_catalogue().to_dict(), **tiny_parts())
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    ckpt["hyper_parameters"]["catalogue"]["tasks"][0]["type"] = "os:system"
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(DataFormatError, match="unknown task type 'os:system'"):
        load_unified(path)


def test_plugin_validation_errors_name_the_field(tmp_path: Path) -> None:
    import tests.plugins.ordinal_task  # noqa: F401

    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": "wear", "type": "ordinal", "classes": ["a", "b"]}]}))
    with pytest.raises(DataFormatError, match=r"tasks\[0\] \(wear\).*at least 3"):
        load_catalogue(path)


def test_unknown_type_and_path_are_reported(tmp_path: Path) -> None:
    for bad in ("ordinall", "tests.plugins.no_such_module:Ordinal", "tests.plugins.ordinal_task:NoSuchClass"):
        with pytest.raises(DataFormatError, match="unknown task type"):
            load_catalogue(_write_catalogue(tmp_path, bad))


def test_ordinal_predictions_are_ordered() -> None:
    import tests.plugins.ordinal_task as plugin

    task = create_task_type(plugin.Ordinal.example_spec())
    logits = torch.tensor([[-3.0, -4.0, -5.0], [3.0, 2.0, -5.0], [5.0, 4.0, 3.0]])
    assert task.predict(logits).tolist() == [0, 2, 3]
    probs = task.class_probabilities(logits)
    assert torch.allclose(probs.sum(1), torch.ones(3)) and probs.argmax(1).tolist() == [0, 2, 3]


def test_a_second_class_cannot_take_a_registered_name() -> None:
    import tests.plugins.ordinal_task  # noqa: F401

    with pytest.raises(ConfigError, match="already registered"):

        @register_task_type
        class Impostor(Classification):
            type_name = "ordinal"


def _dataset_with_wear(root: Path, type_name: str) -> Path:
    """The tiny dataset plus a task ``wear`` of the plug-in type, applying to every doc type, labelled."""
    from tests.conftest import make_tiny_dataset

    make_tiny_dataset(root)
    cat = yaml.safe_load((root / "tasks.yaml").read_text())
    cat["tasks"].append({"name": "wear", "type": type_name, "classes": ["new", "worn", "damaged"]})
    for dt in cat["doc_types"]:
        cat["doc_types"][dt].append("wear")
    (root / "tasks.yaml").write_text(yaml.safe_dump(cat, sort_keys=False))
    for split in ("train", "val", "test"):
        lines = [json.loads(ln) for ln in (root / f"{split}.jsonl").read_text().splitlines()]
        for i, line in enumerate(lines):
            line["labels"]["wear"] = ["new", "worn", "damaged"][i % 3]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(ln) for ln in lines) + "\n")
    return root


def test_an_external_type_goes_through_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plug-in, known only through its distribution's entry point, is checked, drawn, trained, tested,
    predicted and recognised with a decision rule on its own field, by the idrecog commands as they are."""
    from PIL import Image

    from idrecog.cli import main
    from idrecog.tasks.registry import TASK_TYPES

    write_entry_point(tmp_path / "site", "wear_ordinal")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(TASK_TYPES, "_entry_points_loaded", False)
    data = _dataset_with_wear(tmp_path / "data", "wear_ordinal")

    assert main(["data", "check", str(data)]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("wear "))
    assert "wear_ordinal" in row and "new=" in row and "damaged=" in row  # its label statistics

    grid = tmp_path / "grid.png"
    assert main(["data", "show", str(data), "--n", "4", "--out", str(grid)]) == 0
    assert Image.open(grid).width > 100

    run = tmp_path / "run"
    config = (ROOT / "lightning_configs" / "unified.yaml").read_text().replace("runs/unified", str(run))
    (tmp_path / "unified.yaml").write_text(config)
    tiny = [
        "--config",
        str(tmp_path / "unified.yaml"),
        "--model.init_args.encoder.init_args.depth=1",
        "--model.init_args.encoder.init_args.img_size=[64, 96]",
        "--model.init_args.decoder.init_args.dim=32",
        "--model.init_args.decoder.init_args.depth=1",
        "--model.init_args.task_options={detection: {num_queries: 4}}",
        "--data.img_size=[64, 96]",
        "--data.num_workers=0",
        "--data.batch_size=4",
        f"--data.root={data}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    # a strong gate loss at a high learning rate: the guidance unit lets every task out after these few steps
    fast_gate = ["--model.init_args.gate_loss_weight=20", "--model.init_args.warmup_steps=1"]
    fast_gate += ["--model.init_args.lr=0.01", "--trainer.max_epochs=3"]
    assert main(["fit", *tiny, *fast_gate]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    assert main(["test", *tiny, f"--ckpt_path={ckpt}"]) == 0
    assert "wear" in capsys.readouterr().out  # its row in the test table (mae, accuracy)

    assert main(["predict", *tiny, f"--ckpt_path={ckpt}"]) == 0
    records = [json.loads(ln) for ln in (run / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert records and all(r["outputs"]["wear"]["class"] in ("new", "worn", "damaged") for r in records)

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {
                        "name": "not_worn_out",
                        "when": {"task": "wear", "field": "rank", "op": "<=", "value": 1},
                        "else": "review",
                    }
                ]
            }
        )
    )
    image = data / json.loads((data / "test.jsonl").read_text().splitlines()[0])["image"]
    assert main(["recognize", str(image), f"--ckpt_path={ckpt}", f"--rules={rules}"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["outputs"]["wear"]["class"] in ("new", "worn", "damaged")
    rank = ["new", "worn", "damaged"].index(record["outputs"]["wear"]["class"])
    assert record["recognition"]["decision"] == ("accept" if rank <= 1 else "review")
