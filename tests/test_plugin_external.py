"""A task type defined outside idrecog (tests/plugins/ordinal_task.py) works by name and by import path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from idrecog.data.catalogue import load_catalogue
from idrecog.data.manifest import read_manifest
from idrecog.errors import ConfigError, DataFormatError
from idrecog.tasks import (
    HeadContext,
    create_task_type,
    get_task_type_class,
    list_task_types,
    register_task_type,
)
from idrecog.tasks.classification import Classification

torch.set_num_threads(1)

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
    targets = task.collate([0, None, 2])
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


def test_import_path_names_the_class(tmp_path: Path) -> None:
    cat = load_catalogue(_write_catalogue(tmp_path, PATH_NAME))
    assert cat["wear"].type == PATH_NAME
    task = create_task_type(cat["wear"])
    assert type(task).__name__ == "Ordinal" and type(task).type_name == "ordinal"
    _train_step(task)


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
