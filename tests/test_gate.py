"""The gate: per sample and task, the guidance unit decides whether the task applies (learned from the data
pipeline's applicability mask) and which unit receives it; tasks whose required inputs are missing are never
answered; the gate as a task resolver in recognition; the gate in the exported graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from idrecog.data.resolution import GATE, AnnotatedResolver, DocTypeResolver, GateResolver
from idrecog.errors import ConfigError
from idrecog.lit.unified import UnifiedModule
from idrecog.tasks.base import HeadContext
from idrecog.tasks.catalogue import TaskCatalogue, TaskSpec
from tests.test_model_fakes import IMG, fake_batch, fake_catalogue, tiny_parts

torch.set_num_threads(1)


def test_the_gate_learns_which_samples_a_task_applies_to() -> None:
    """Applicability that differs per sample (not a constant per task): the guidance unit learns it from the
    task features, and a mask of unknown pairs keeps them out of the loss."""
    torch.manual_seed(0)
    m = UnifiedModule(catalogue=fake_catalogue().to_dict(), **tiny_parts())
    itp = m.model.interpreter
    g = torch.Generator().manual_seed(0)
    feats = {t: torch.randn(64, 2, 64, generator=g) for t in "abc"}
    # [B, T], differs per sample: the sign of one feature of the task's mean query (what the guidance unit reads)
    target = torch.stack([feats[t].mean(1)[:, 0] > 0 for t in "abc"], dim=1)
    known = torch.ones_like(target)
    known[:8] = False  # unknown pairs: their (here wrong) targets must not be learned
    wrong = target.clone()
    wrong[:8] = ~wrong[:8]
    opt = torch.optim.Adam(itp.guidance.parameters(), lr=3e-2)
    ctx = HeadContext(pixel_feats=None, image_size=IMG)
    for _ in range(300):
        _, types, applies, _ = itp(feats, ctx, "known")
        loss = itp.gate_loss(types, applies, wrong.float(), known)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, _, applies, routed = itp(feats, ctx, "guided")
    decided = torch.stack([applies[t] > 0 for t in "abc"], dim=1)
    # right on nearly every pair, the 8 samples with masked (wrong) targets included; a constant per task would
    # score about one half
    assert (decided == target).float().mean() > 0.9
    assert torch.equal(torch.stack([routed[t] for t in "abc"], dim=1), decided)


def _needs_frames_catalogue() -> TaskCatalogue:
    return TaskCatalogue(
        tasks=[
            TaskSpec("a", "fake_label", classes=("x", "y", "z")),
            TaskSpec("h", "fake_label", classes=("g", "c"), frames="multi", uses=("flash", "angles"),
                     requires=("flash", "angles")),
        ],
        source="needs-frames",
    )  # fmt: skip


def test_a_task_without_its_required_inputs_is_never_answered() -> None:
    """Learned queries read no frames: the task that requires them is withheld for every sample, with the reason,
    however open its gate; with its inputs missing it does not apply, and its applies logit learns nothing there."""
    cat = _needs_frames_catalogue()
    m = UnifiedModule(catalogue=cat.to_dict(), **tiny_parts()).eval()
    itp = m.model.interpreter
    with torch.no_grad():
        itp.guidance[-1].bias.zero_()
        itp.guidance[-1].bias[0] = 1e4  # every task applies, and the right unit opens
        itp.guidance[-1].bias[1 + itp.type_names.index("fake_label")] = 1e4
        batch = fake_batch(cat, b=2)
        res = m.predict_step(batch, 0)
        out = m.model(batch["image"], batch=batch, route="guided")
    assert not out["available"]["h"].any() and not out["routed"]["h"].any() and out["routed"]["a"].all()
    assert all(r["withheld"] == {"h": "needs flash and angle frames"} for r in res)
    assert all("a" in r["outputs"] for r in res)
    target, known, available = m.gate_targets(out, batch)
    h = cat.index("h")
    assert not target[:, h].any() and not known[:, h].any() and not available[:, h].any()
    assert target[:, 0].all() and known[:, 0].all()


def test_the_recognizer_withholds_a_hologram_without_frames_and_asks_for_review(tmp_path: Path) -> None:
    from idrecog.recognition.recognizer import RecognitionRequest, Recognizer
    from idrecog.recognition.rules import default_rules_path
    from tests.test_recognize import make_tiny_module

    module = make_tiny_module()
    itp = module.model.interpreter
    with (
        torch.no_grad()
    ):  # a confident gate: every task applies (the hologram is a classification task's unit)
        itp.guidance[-1].weight.zero_()
        itp.guidance[-1].bias.zero_()
        itp.guidance[-1].bias[0] = 1e4
        itp.guidance[-1].bias[1 + itp.type_names.index("classification")] = 1e4
    rec = Recognizer(module, rules=default_rules_path())
    image = Image.new("RGB", (96, 64), (200, 190, 180))
    record = rec.recognize([RecognitionRequest(image=image, id="x", doc_type="ald_id_card")])[0]
    assert "hologram" in record["tasks"]["resolved"]
    assert record["withheld"]["hologram"] == "needs flash and angle frames"
    assert "hologram" not in record["outputs"]
    why = [r for r in record["recognition"]["reasons"] if r.get("task") == "hologram"]
    assert len(why) == 1 and why[0]["rule"] == "inputs_supplied" and why[0]["outcome"] == "review"
    assert why[0]["note"] == "needs flash and angle frames"
    assert record["recognition"]["decision"] in ("review", "reject")


def test_the_gate_resolver_keeps_the_open_tasks_of_the_doc_type() -> None:
    cat = TaskCatalogue.from_dict(
        {
            "tasks": [
                {"name": "doc", "type": "classification", "classes": ["id", "pp"]},
                {"name": "holo", "type": "classification", "classes": ["g", "c"]},
                {"name": "q", "type": "regression", "range": [0, 1]},
            ],
            "doc_types": {"id": ["doc", "holo", "q"], "pp": ["doc", "q"]},
        }
    )
    r = GateResolver(cat)
    routing = [
        {
            "doc": {"open": True},
            "holo": {"open": False},
            "q": {"open": True},
        },  # an id card issue without foil
        {"doc": {"open": True}, "holo": {"open": True}, "q": {"open": True}},
        {"doc": {"open": True}, "holo": {"open": True}, "q": {"open": False}},
    ]
    res = r.resolve_batch(["id", "pp", None], routing=routing)
    assert [x.tasks for x in res] == [["doc", "q"], ["doc", "q"], ["doc", "holo"]]
    assert {x.how for x in res} == {GATE}
    with pytest.raises(ConfigError, match="routing"):
        r.resolve_batch(["id"])


def test_the_annotated_resolver_reads_the_manifest_tasks(tmp_path: Path) -> None:
    from idrecog.data.manifest import read_manifest
    from idrecog.synth.generate import generate_dataset

    root = generate_dataset(tmp_path / "d", train=40, val=0, test=0, missing_fraction=0.0, progress=False)
    from idrecog.tasks.catalogue import load_catalogue

    cat = load_catalogue(root / "tasks.yaml")
    samples = read_manifest(root / "train.jsonl", cat)
    ann = AnnotatedResolver(cat).resolve(samples, "train")
    by_dt = DocTypeResolver(cat).resolve(samples, "train")
    assert ann == [cat_order(cat, s.tasks) for s in samples]
    assert all(set(a) <= set(b) for a, b in zip(ann, by_dt, strict=True))
    differ = [i for i, (a, b) in enumerate(zip(ann, by_dt, strict=True)) if a != b]
    assert differ  # the task set is not a function of the doc type
    for i in differ:  # the tool wrote a default label for every doc-type task that does not apply
        s = samples[i]
        assert all(s.labels.get(t) is not None for t in set(by_dt[i]) - set(ann[i]))
    assert all(AnnotatedResolver(cat).known(samples))


def _half_annotated(tmp_path: Path) -> tuple[Path, TaskCatalogue, list]:
    """A generated dataset whose odd train samples lost their annotated task set."""
    import dataclasses

    from idrecog.data.manifest import read_manifest
    from idrecog.synth.generate import generate_dataset
    from idrecog.tasks.catalogue import load_catalogue

    root = generate_dataset(tmp_path / "d", train=40, val=24, test=0, missing_fraction=0.0, progress=False)
    cat = load_catalogue(root / "tasks.yaml")
    samples = [
        dataclasses.replace(s, tasks=None) if i % 2 else s
        for i, s in enumerate(read_manifest(root / "train.jsonl", cat))
    ]
    return root, cat, samples


def test_the_gate_resolver_trains_annotated_sets_and_lets_the_gate_decide_the_others(tmp_path: Path) -> None:
    from idrecog.data.dataset import IdDataset

    root, cat, samples = _half_annotated(tmp_path)
    r = GateResolver(cat)
    by_dt = DocTypeResolver(cat).resolve(samples, "train")
    assert r.resolve(samples, "train") == [
        cat_order(cat, s.tasks) if s.tasks is not None else d for s, d in zip(samples, by_dt, strict=True)
    ]
    assert r.known(samples) == [s.tasks is not None for s in samples]
    ds = IdDataset(root, "train", cat, resolver=r, samples=samples)
    assert torch.equal(ds.gate_decides, ~ds.applies_known) and ds.gate_decides.sum() == len(samples) // 2
    assert bool(ds[1]["gate_decides"]) and not bool(ds[0]["gate_decides"])
    # the other resolvers never defer to the model
    assert not IdDataset(
        root, "train", cat, resolver=AnnotatedResolver(cat), samples=samples
    ).gate_decides.any()


def test_samples_the_gate_decides_train_only_the_tasks_it_opens_with_confidence() -> None:
    cat = fake_catalogue()
    m = UnifiedModule(catalogue=cat.to_dict(), gate_train_threshold=0.9, **tiny_parts())
    batch = fake_batch(cat, b=5)
    batch["gate_decides"] = torch.tensor([True, False, True, False, True])
    # closed, closed, open, open, open at the gate's own threshold (p 0.73) but not confidently
    logit = torch.tensor([-5.0, -5.0, 5.0, 5.0, 1.0])
    m._let_the_gate_decide({"open_logits": {t: logit for t in cat.names}}, batch)
    # sample 0: the gate decides and is closed -> nothing trains; 1: annotated, closed gate changes nothing;
    # 4: an unsure gate lets no (possibly default) label train
    assert batch["present"].tolist() == [
        [False] * len(cat),
        [True] * len(cat),
        [True] * len(cat),
        [True] * len(cat),
        [False] * len(cat),
    ]


@pytest.mark.parametrize("threshold", [0.4, 1.0])
def test_gate_train_threshold_out_of_range_is_refused(threshold: float) -> None:
    with pytest.raises(ConfigError, match="gate_train_threshold"):
        UnifiedModule(catalogue=fake_catalogue().to_dict(), gate_train_threshold=threshold, **tiny_parts())


def test_val_and_test_can_be_scored_on_the_annotated_task_sets(tmp_path: Path) -> None:
    from idrecog.data.datamodule import IdDataModule

    root, cat, _ = _half_annotated(tmp_path)
    dm = IdDataModule(
        root=str(root), task_resolver="all", eval_task_resolver="annotated", preflight_cache_dir=""
    )
    dm.setup("fit")
    assert dm.datasets["train"].applies.all()  # every task on every sample
    val = dm.datasets["val"]
    expected = AnnotatedResolver(cat).resolve(val.samples, "val")
    assert [
        cat_order(cat, [t for t, a in zip(cat.names, row, strict=True) if a]) for row in val.applies.tolist()
    ] == expected
    assert not val.applies.all()
    with pytest.raises(ConfigError, match=r"data\.eval_task_resolver: unknown resolver 'nope'"):
        IdDataModule(root=str(root), eval_task_resolver="nope")


def cat_order(cat: TaskCatalogue, tasks: list[str]) -> list[str]:
    return [t for t in cat.names if t in tasks]


def test_the_exported_graph_carries_the_gate_and_refuses_designs_that_read_more_than_images() -> None:
    from idrecog.models.multimodal import MultimodalQueries
    from idrecog.recognition.export import ExportModule

    m = UnifiedModule(catalogue=fake_catalogue().to_dict(), **tiny_parts()).eval()
    wrapper = ExportModule(m.model)
    assert {"a.open_logits", "a.gate_logits"} <= set(wrapper.output_names)
    with torch.no_grad():
        outs = dict(zip(wrapper.output_names, wrapper(torch.randn(2, 3, *IMG)), strict=True))
        ref = m.model(torch.randn(2, 3, *IMG) * 0, route="known")
    assert outs["a.open_logits"].shape == (2,) and ref["open_logits"]["a"].shape == (2,)
    mm = MultimodalQueries.__new__(MultimodalQueries)
    torch.nn.Module.__init__(mm)

    class _Fake(torch.nn.Module):
        queries = mm

    with pytest.raises(ConfigError, match="frames or user information"):
        ExportModule(_Fake())
