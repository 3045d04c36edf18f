"""Anti-fraud parts: attack error rates (APCER/BPCER) and their wiring into classification tasks, which tasks a
query design can be scored on, the detail branch, the manifest's evidence boxes, and the cue pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idrecog.errors import ConfigError, DataFormatError
from idrecog.tasks import create_task_type
from idrecog.tasks.catalogue import TaskCatalogue, TaskSpec
from idrecog.tasks.metrics import APCER, BPCER

torch.set_num_threads(1)


def test_apcer_and_bpcer_count_misclassified_presentations() -> None:
    g = torch.Generator().manual_seed(0)
    score = torch.rand(200, generator=g)
    attack = (torch.rand(200, generator=g) < 0.3).long()
    for thr in (0.3, 0.5, 0.8):
        a, b = APCER(threshold=thr), BPCER(threshold=thr)
        a.update(score[:120], attack[:120])  # two batches: the states add up
        a.update(score[120:], attack[120:])
        b.update(score, attack)
        said_attack = score >= thr
        expected_apcer = (~said_attack & (attack == 1)).sum() / (attack == 1).sum()
        expected_bpcer = (said_attack & (attack == 0)).sum() / (attack == 0).sum()
        torch.testing.assert_close(a.compute(), expected_apcer.float())
        torch.testing.assert_close(b.compute(), expected_bpcer.float())


def test_a_bona_fide_class_adds_the_attack_metrics() -> None:
    spec = TaskSpec("pad", "classification", classes=("bona_fide", "replay", "injection"))
    tt = create_task_type(spec, bona_fide="bona_fide", operating_threshold=0.6)
    metrics = tt.build_metrics()
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [2.0, 1.9, 0.0]])
    y = torch.tensor([0, 1, 2, 1])
    tt.update_metrics(metrics, {"logits": logits}, y, torch.ones(4, dtype=torch.bool))
    out = tt.compute_metrics(metrics)
    # the last sample is an attack whose attack score 1 - P(bona fide) is under 0.6: 1 of 3 attacks missed
    assert float(out["apcer"]) == pytest.approx(1 / 3) and float(out["bpcer"]) == 0.0
    assert {"f1_macro", "accuracy", "auroc", "attack_auroc"} <= set(out) and tt.primary_metric == "f1_macro"
    plain = create_task_type(spec).build_metrics()
    assert "apcer" not in plain
    with pytest.raises(ConfigError, match=r"options\.bona_fide"):
        create_task_type(spec, bona_fide="genuine")
    with pytest.raises(ConfigError, match=r"options\.operating_threshold"):
        create_task_type(spec, bona_fide="bona_fide", operating_threshold=1.0)


def test_requires_is_checked_against_uses() -> None:
    base = {"name": "holo", "type": "classification", "classes": ["a", "b"], "frames": "multi"}
    cat = TaskCatalogue.from_dict({"tasks": [{**base, "uses": ["flash", "angles"], "requires": ["flash"]}]})
    assert cat["holo"].requires == ("flash",)
    assert TaskCatalogue.from_dict(cat.to_dict())["holo"].requires == ("flash",)
    with pytest.raises(DataFormatError, match=r"tasks\[0\] \(holo\)\.requires"):
        TaskCatalogue.from_dict({"tasks": [{**base, "uses": ["flash"], "requires": ["user"]}]})
    # one part of the user information: only where the task uses user information, and only a known part
    nat = {"name": "nat", "type": "classification", "classes": ["a", "b"], "uses": ["user"]}
    cat = TaskCatalogue.from_dict({"tasks": [{**nat, "requires": ["user.attributes"]}]})
    assert cat["nat"].requires == ("user.attributes",) and cat["nat"].required_user_parts == ("attributes",)
    assert TaskCatalogue.from_dict(cat.to_dict())["nat"].requires == ("user.attributes",)
    for bad in ({**nat, "requires": ["user.colour"]}, {**nat, "uses": [], "requires": ["user.attributes"]}):
        with pytest.raises(DataFormatError, match=r"tasks\[0\] \(nat\)\.requires"):
            TaskCatalogue.from_dict({"tasks": [bad]})


def test_the_score_leaves_out_tasks_the_queries_cannot_answer() -> None:
    from idrecog.models.multimodal import MultimodalQueries
    from idrecog.models.queries import LearnedQueries

    assert LearnedQueries().reads([]) and not LearnedQueries().reads(["flash", "angles"])
    assert not LearnedQueries().reads(["user"])
    assert MultimodalQueries.consumes_frames and MultimodalQueries.consumes_user
    mm = MultimodalQueries.__new__(MultimodalQueries)  # the class attributes decide; no model needed
    assert MultimodalQueries.reads(mm, ["flash", "angles", "user"])
    assert MultimodalQueries.reads(mm, ["user.attributes", "user.behaviour"])
    assert not LearnedQueries().reads(["user.attributes"])
    mm.user_parts = frozenset({"behaviour"})  # an ablation that drops the declared details
    assert mm.reads(["user.behaviour"]) and not mm.reads(["user.attributes"])


def test_the_declared_details_are_at_hand_only_where_supplied() -> None:
    """``requires: [user.attributes]``: available where the sample has user info with at least one attribute
    (index 0 is missing), whatever behaviour it recorded; never with queries that do not read the attributes."""
    from types import SimpleNamespace

    from idrecog.models.multimodal import MultimodalQueries
    from idrecog.models.unified import UnifiedModel

    cat = TaskCatalogue.from_dict(
        {
            "tasks": [
                {"name": "nat", "type": "classification", "classes": ["a", "b"], "uses": ["user"],
                 "requires": ["user.attributes"]},
                {"name": "pad", "type": "classification", "classes": ["a", "b"], "uses": ["user"],
                 "requires": ["user"]},
            ]
        }
    )  # fmt: skip
    user = {
        "attributes": torch.tensor([[3, 0], [0, 0], [2, 1], [0, 0]]),
        "behaviour": torch.zeros(4, 2),
        "behaviour_mask": torch.tensor([[True, True], [True, False], [False, False], [False, False]]),
        "mask": torch.tensor([True, True, False, True]),
    }
    mm = MultimodalQueries.__new__(MultimodalQueries)
    at_hand = UnifiedModel.inputs_at_hand(SimpleNamespace(catalogue=cat, queries=mm), ["nat", "pad"], 4,
                                          {"user": user}, "cpu")  # fmt: skip
    assert at_hand["nat"].tolist() == [True, False, False, False]
    assert at_hand["pad"].tolist() == [True, True, False, True]
    mm.user_parts = frozenset({"behaviour"})
    at_hand = UnifiedModel.inputs_at_hand(
        SimpleNamespace(catalogue=cat, queries=mm), ["nat"], 4, {"user": user}, "cpu"
    )
    assert not at_hand["nat"].any()


def _tiny_module(detail: bool):
    from idrecog.lit.unified import UnifiedModule
    from idrecog.models.detail import DetailBranch
    from tests.test_model_fakes import fake_catalogue, tiny_parts

    torch.manual_seed(0)
    parts = tiny_parts()
    return UnifiedModule(
        catalogue=fake_catalogue().to_dict(),
        **parts,
        detail=DetailBranch(["a"], backbone="resnet10t", stride=8) if detail else None,
    )


def test_the_detail_branch_feeds_only_its_tasks() -> None:
    from tests.test_model_fakes import IMG

    m = _tiny_module(detail=True).eval()
    images = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        before = m.model(images)["outputs"]
        for p in m.model.detail.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        after = m.model(images)["outputs"]
    assert not torch.allclose(before["a"]["logits"], after["a"]["logits"])  # "a" reads the detail tokens
    torch.testing.assert_close(before["b"]["logits"], after["b"]["logits"])  # "b" does not
    torch.testing.assert_close(before["c"]["value"], after["c"]["value"])
    m.train()
    out = m.model(images)
    out["outputs"]["a"]["logits"].sum().backward()
    assert all(p.grad is not None for p in m.model.detail.cnn.parameters() if p.requires_grad)


def test_the_detail_branch_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    from idrecog.lit.unified import load_unified
    from tests.test_model_fakes import IMG

    m = _tiny_module(detail=True).eval()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    again = load_unified(path)
    x = torch.randn(1, 3, *IMG)
    with torch.no_grad():
        torch.testing.assert_close(
            m.model(x)["outputs"]["a"]["logits"], again.model(x)["outputs"]["a"]["logits"]
        )


def test_detail_branch_errors_name_the_field() -> None:
    from idrecog.models.detail import DetailBranch

    with pytest.raises(ConfigError, match=r"detail\.tasks"):
        DetailBranch([])
    with pytest.raises(ConfigError, match=r"detail\.backbone"):
        DetailBranch(["a"], backbone="no_such_cnn")
    with pytest.raises(ConfigError, match=r"detail\.stride 3"):
        DetailBranch(["a"], backbone="resnet10t", stride=3)
    branch = DetailBranch(["zz"], backbone="resnet10t")
    with pytest.raises(ConfigError, match=r"detail\.tasks names \['zz'\]"):
        branch.build(32, (64, 96), ["a", "b"])


def test_manifest_evidence_boxes(tiny_dataset: Path) -> None:
    from idrecog.data.manifest import read_manifest
    from idrecog.tasks.catalogue import load_catalogue

    cat = load_catalogue(tiny_dataset / "tasks.yaml")
    path = tiny_dataset / "val.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[0]["evidence"] = {"tampering": [10, 5, 30, 20]}
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    s = read_manifest(path, cat)[0]
    assert s.evidence == {"tampering": [10.0, 5.0, 30.0, 20.0]} and s.to_json()["evidence"] == s.evidence
    for bad, field in (
        ({"nope": [0, 0, 1, 1]}, "evidence.nope"),
        ({"tampering": [5, 0, 1, 1]}, "evidence.tampering"),
    ):
        lines[0]["evidence"] = bad
        path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        with pytest.raises(DataFormatError, match=rf"val\.jsonl:1: field '{field}'"):
            read_manifest(path, cat)


def test_cue_pictures(tmp_path: Path) -> None:
    from PIL import Image

    from idrecog.cli import main
    from idrecog.synth.generate import generate_dataset

    root = generate_dataset(tmp_path / "d", train=0, val=40, test=0, workers=1, progress=False)
    lines = [json.loads(x) for x in (root / "val.jsonl").read_text().splitlines()]
    assert any("evidence" in x for x in lines)  # forgeries carry their cue's box
    out = tmp_path / "cues.png"
    assert (
        main(["data", "cues", str(root), "--out", str(out), "--per_class", "1", "--img_size", "[80, 128]"])
        == 0
    )
    assert Image.open(out).height > 300
    assert main(["data", "cues", str(root), "--out", str(out), "--task", "visibility"]) == 0
    assert (
        main(["data", "cues", str(root), "--out", str(out), "--task", "image_quality"]) == 2
    )  # not a class task
