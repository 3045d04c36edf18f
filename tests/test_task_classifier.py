"""Task classifier (targets, loss masking, metrics, weights_only checkpoints) and the ``classifier`` task resolver
(contract, on-disk cache and its invalidation, per-task thresholds, bad input, end-to-end fit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from idrecog.cli import main as idrecog_main
from idrecog.data.datamodule import IdDataModule
from idrecog.data.dataset import IdDataset
from idrecog.data.manifest import Sample, read_manifest
from idrecog.data.resolution import DocTypeResolver, create_task_resolver, list_task_resolvers
from idrecog.data.resolution.classifier import ClassifierResolver
from idrecog.errors import ConfigError
from idrecog.lit.task_classifier import TaskClassifierModule, load_task_classifier, task_targets
from idrecog.models.encoder import ViTEncoder
from idrecog.tasks.catalogue import TaskCatalogue, TaskSpec, default_catalogue, load_catalogue
from tests.conftest import TINY_SIZE, make_tiny_dataset

CAT = default_catalogue()


def _tiny_classifier(seed: int = 0) -> TaskClassifierModule:
    torch.manual_seed(seed)
    return TaskClassifierModule(catalogue=CAT.to_dict(), backbone="test_resnet", input_size=(32, 48))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, float]]:
    """(dataset folder, classifier checkpoint saved by a Lightning Trainer, the validation metrics)."""
    root = tmp_path_factory.mktemp("taskcls")
    data = make_tiny_dataset(root / "data", n_train=12, n_val=6, n_test=2)
    dm = IdDataModule(root=str(data), img_size=TINY_SIZE, batch_size=6, augment=False)
    module = _tiny_classifier()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    ckpt = root / "classifier.ckpt"
    trainer.save_checkpoint(ckpt)
    return data, ckpt, {k: float(v) for k, v in trainer.callback_metrics.items()}


# ---------------------------------------------------------------------------------------------- the model
def test_targets_come_from_the_doc_types_mapping() -> None:
    targets, known = task_targets(CAT, ["brv_driving_licence", None, "ald_id_card", "brv_id_card"])
    assert known.tolist() == [True, False, True, True]
    names = CAT.names
    assert [names[j] for j in targets[0].nonzero().flatten()] == CAT.tasks_for("brv_driving_licence")
    assert targets[1].sum() == 0 and targets[2].sum() == len(names)
    assert targets[3, names.index("hologram")] == 0 and targets[3, names.index("nationality_match")] == 1


def test_loss_ignores_samples_without_doc_type() -> None:
    m = _tiny_classifier()
    logits = torch.randn(3, len(CAT), requires_grad=True)
    loss, _, known = m.loss(logits, ["ald_passport", None, "cst_passport"])
    assert known.tolist() == [True, False, True]
    loss.backward()
    assert logits.grad is not None and logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    # the unknown row's logits do not move the loss
    other = logits.detach().clone()
    other[1] = 100.0
    assert m.loss(other, ["ald_passport", None, "cst_passport"])[0] == pytest.approx(float(loss.detach()))
    empty, _, _ = m.loss(logits, [None, None, None])
    assert float(empty.detach()) == 0.0 and empty.requires_grad


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # the step runs without a Trainer
def test_exact_match_readable_leaves_out_images_without_a_doc_type_label(monkeypatch) -> None:
    """A sample whose doc-type label is null (its image does not show the doc type) counts in exact_match but not
    in exact_match_readable; a sample without doc_type counts in neither."""
    m = _tiny_classifier()
    assert CAT.doc_type_task == "doc_type"
    doc_types = ["ald_passport", "brv_id_card", "cst_passport", None]
    targets, _ = task_targets(CAT, doc_types)
    logits = targets * 20 - 10  # every task set right ...
    logits[1] = -logits[1]  # ... but the second one's
    monkeypatch.setattr(m, "forward", lambda images: logits)
    present = torch.ones(4, len(CAT), dtype=torch.bool)
    present[1, CAT.index("doc_type")] = False  # the second image shows no document
    m._step({"image": torch.zeros(4, 3, 8, 8), "doc_type": doc_types, "present": present}, "val")
    assert float(m.metrics["val"]["exact_match"].compute()) == pytest.approx(2 / 3)
    assert float(m.readable_exact_match["val"].compute()) == 1.0
    assert m.readable_exact_match["val"].update_count == 1


def test_catalogue_without_doc_types_is_refused() -> None:
    cat = TaskCatalogue([TaskSpec("a", "classification", classes=("x", "y"))])
    with pytest.raises(ConfigError, match="doc_types"):
        TaskClassifierModule(catalogue=cat.to_dict(), backbone="test_resnet")
    with pytest.raises(ConfigError, match="not_a_model"):
        TaskClassifierModule(backbone="not_a_model")


def test_shared_encoder_backbone() -> None:
    enc = ViTEncoder("vit_tiny_patch16_224", img_size=(32, 48), depth=1, embed_dim=32, num_heads=2)
    m = TaskClassifierModule(encoder=enc)
    assert m.hparams["backbone"] is None and m.hparams["encoder"]["init_args"]["embed_dim"] == 32
    assert m.input_size == (32, 48)
    assert m(torch.randn(2, 3, 64, 96)).shape == (2, len(CAT))  # other sizes are resized
    # the encoder's blocks get their own (layer-decayed) lr groups; every parameter is optimised once
    opt = m.configure_optimizers()["optimizer"]
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert len({g["lr"] for g in opt.param_groups}) > 1


def test_fit_logs_metrics_and_checkpoint_loads_weights_only(trained) -> None:
    _, ckpt, metrics = trained
    assert "val/exact_match" in metrics and 0.0 <= metrics["val/exact_match"] <= 1.0
    assert 0.0 <= metrics["val/exact_match_readable"] <= 1.0
    assert all(f"val/{t}/f1" in metrics for t in CAT.names)
    # the tiny val split has every doc type once (its last line has no doc type)
    assert {f"val/task_set_acc/{dt}" for dt in list(CAT.doc_types or {})[:5]} <= set(metrics)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["catalogue"] == CAT.to_dict()
    module = load_task_classifier(ckpt)
    again = load_task_classifier(ckpt)
    x = torch.randn(2, 3, *TINY_SIZE)
    assert torch.equal(module(x), again(x))
    assert module.predict_proba(x).shape == (2, len(CAT))


# ---------------------------------------------------------------------------------------------- the resolver
def _resolver(ckpt: Path, tmp_path: Path, **kwargs) -> ClassifierResolver:
    return ClassifierResolver(CAT, ckpt, cache_dir=tmp_path / "cache", **kwargs)


def test_resolver_contract_matches_doc_type_resolver(trained, tmp_path: Path) -> None:
    data, ckpt, _ = trained
    assert "classifier" in list_task_resolvers()
    samples = read_manifest(data / "train.jsonl", CAT)
    r = create_task_resolver("classifier", CAT, task_classifier_ckpt=str(ckpt), cache_dir=str(tmp_path / "c"))
    assert isinstance(r, ClassifierResolver) and "classifier" in r.describe()
    out = r.resolve(samples, "train")
    by_doc_type = DocTypeResolver(CAT).resolve(samples, "train")
    assert len(out) == len(samples)
    for s, got, ref in zip(samples, out, by_doc_type, strict=True):
        assert got == [t for t in CAT.names if t in got]  # catalogue order
        if s.doc_type is not None:
            assert got == ref  # missing_only: the mapping decides where the doc type is known
    assert r.last_stats["resolved"] == sum(s.doc_type is None for s in samples) == 1
    assert r.last_stats["agreement_samples"] == len(samples) - 1  # `check` covers the known ones here
    assert sum(r.summary(out).values()) == sum(map(len, out))
    # mode all: the classifier decides for every sample
    r_all = _resolver(ckpt, tmp_path, mode="all", threshold=0.01)
    assert r_all.resolve(samples, "train") == [CAT.names] * len(samples)
    assert r_all.last_stats["resolved"] == len(samples)
    # it plugs into the dataset like the doc-type resolver
    ds = IdDataset(data, "train", CAT, resolver=r)
    assert ds.applies.shape == (len(samples), len(CAT))


def test_unannotated_mode_keeps_annotated_task_sets(trained, tmp_path: Path) -> None:
    """Mode unannotated: a sample with an annotated task set keeps it, the classifier decides for the others, and
    only annotated sets count as known (the classifier's guesses do not teach the gate)."""
    import dataclasses

    data, ckpt, _ = trained
    first = CAT.names[:1]
    samples = [
        dataclasses.replace(s, tasks=first if i % 2 == 0 else None)
        for i, s in enumerate(read_manifest(data / "train.jsonl", CAT))
    ]
    r = _resolver(ckpt, tmp_path, mode="unannotated", threshold=0.01)  # the classifier: every task applies
    out = r.resolve(samples, "train")
    assert out == [first if i % 2 == 0 else CAT.names for i in range(len(samples))]
    assert r.known(samples) == [i % 2 == 0 for i in range(len(samples))]
    assert r.last_stats["resolved"] == len(samples) // 2


def test_cache_hit_and_invalidation(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ckpt, _ = trained
    root = tmp_path / "d"
    shutil.copytree(data, root)
    ck = tmp_path / "c.ckpt"
    shutil.copy(ckpt, ck)
    samples = read_manifest(root / "train.jsonl", CAT)
    first = _resolver(ck, tmp_path)
    out = first.resolve(samples, "train")
    assert first.last_stats["cache_hit"] is False
    calls = []
    real = ClassifierResolver._classify
    monkeypatch.setattr(
        ClassifierResolver, "_classify", lambda self, s: calls.append(len(s)) or real(self, s)
    )
    second = _resolver(ck, tmp_path)
    assert second.resolve(samples, "train") == out
    assert second.last_stats["cache_hit"] is True and calls == []
    # thresholds are applied after the cache: a new threshold is still a hit
    assert _resolver(ck, tmp_path, threshold=0.9).resolve(samples, "train") is not None and calls == []
    # the manifest changes -> miss
    lines = (root / "train.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"genuine"', '"text_edit"', 1)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    changed = read_manifest(root / "train.jsonl", CAT)
    r = _resolver(ck, tmp_path)
    r.resolve(changed, "train")
    assert r.last_stats["cache_hit"] is False and len(calls) == 1
    r.resolve(changed, "train")
    assert r.last_stats["cache_hit"] is True and len(calls) == 1
    # the checkpoint changes -> miss
    obj = torch.load(ck, weights_only=True)
    obj["state_dict"]["net.head.1.bias"] += 0.5
    torch.save(obj, ck)
    r = _resolver(ck, tmp_path)
    r.resolve(changed, "train")
    assert r.last_stats["cache_hit"] is False and len(calls) == 2


def test_thresholds_per_task(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, ckpt, _ = trained
    r = _resolver(ckpt, tmp_path, threshold={"hologram": 0.7, "nationality_match": 0.3})
    probs = torch.full((2, len(CAT)), 0.6)
    probs[1, CAT.index("nationality_match")] = 0.2
    monkeypatch.setattr(r._model, "predict_proba", lambda x: probs[: x.shape[0]])
    everything_but = [t for t in CAT.names if t != "hologram"]
    out = r.classify_images(torch.zeros(2, 3, *TINY_SIZE))
    assert out[0] == everything_but  # 0.6 < 0.7 for hologram; the others use 0.5
    assert out[1] == [t for t in everything_but if t != "nationality_match"]  # 0.2 < 0.3
    assert _resolver(ckpt, tmp_path, threshold=0.65).apply_thresholds(probs) == [[], []]
    with pytest.raises(ConfigError, match=r"unknown task.*holgram"):
        _resolver(ckpt, tmp_path, threshold={"holgram": 0.5})
    with pytest.raises(ConfigError, match="threshold"):
        _resolver(ckpt, tmp_path, threshold=1.5)


def test_bad_input(trained, tmp_path: Path) -> None:
    _, ckpt, _ = trained
    with pytest.raises(ConfigError, match="checkpoint not found"):
        create_task_resolver("classifier", CAT, task_classifier_ckpt=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="task_classifier_ckpt"):
        create_task_resolver("classifier", CAT)
    # the DataModule refuses it when built, before generating or reading any data
    with pytest.raises(ConfigError, match="checkpoint not found"):
        IdDataModule(
            root=str(tmp_path / "not_yet"),
            synthesize_if_missing=True,
            task_resolver="classifier",
            resolver_args={"task_classifier_ckpt": str(tmp_path / "missing.ckpt")},
        )
    assert not (tmp_path / "not_yet").exists()
    with pytest.raises(ConfigError, match="mode"):
        _resolver(ckpt, tmp_path, mode="sometimes")
    # a catalogue with other tasks: the error lists them
    d = CAT.to_dict()
    d["tasks"][2]["name"] = "visible"
    d["tasks"].append({"name": "glare", "type": "regression", "range": [0, 1]})
    d["doc_types"] = {
        k: [("visible" if t == "visibility" else t) for t in v] for k, v in d["doc_types"].items()
    }
    other = TaskCatalogue.from_dict(d, source="other/tasks.yaml")
    with pytest.raises(
        ConfigError, match=r"only in the checkpoint: visibility; only in other/tasks.yaml: visible, glare"
    ):
        ClassifierResolver(other, ckpt, cache_dir=tmp_path)
    # not a task-classifier checkpoint
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, bogus)
    with pytest.raises(ConfigError, match="not a task-classifier checkpoint"):
        ClassifierResolver(CAT, bogus, cache_dir=tmp_path)


def _classifier_config(tmp_path: Path, data: Path, trainer: dict, data_args: dict) -> Path:
    """A LightningCLI config of the tiny classifier on ``data``; its outputs (config.yaml too, which LightningCLI
    saves to the working directory when there is no logger) go under ``tmp_path``."""
    config = {
        "trainer": {"accelerator": "cpu", "default_root_dir": str(tmp_path / "run"), **trainer},
        "model": {
            "class_path": "idrecog.lit.task_classifier.TaskClassifierModule",
            "init_args": {"backbone": "test_resnet", "input_size": [32, 48]},
        },
        "data": {"root": str(data), "img_size": list(TINY_SIZE), **data_args},
    }
    path = tmp_path / "classifier.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_command_prints_the_classifiers_own_table(trained, tmp_path: Path, capsys) -> None:
    """`idrecog fit` of the task classifier ends with its exact-match figures, per-task F1 and per-doc-type
    task-set accuracy, not the unified model's per-task-type table."""
    data, _, _ = trained
    path = _classifier_config(tmp_path, data, {"fast_dev_run": True}, {"batch_size": 6, "augment": False})
    assert idrecog_main(["fit", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    val = out[out.index("[val] ") :]
    assert val.startswith("[val] exact_match=") and "exact_match_readable=" in val.splitlines()[0]
    assert "task (applies: F1)" in val and "doc type (task-set accuracy)" in val
    assert all(f"\n{t} " in val for t in CAT.names)
    assert "regression" not in val and "segmentation" not in val  # no task-type column


def test_predict_command_writes_task_sets(trained, tmp_path: Path) -> None:
    """`idrecog predict` with the config's JsonlWriter: one line per predict-split image, its tasks the ones whose
    probability reaches the checkpoint's threshold (0.5)."""
    data, ckpt, _ = trained
    out = tmp_path / "pred"
    writer = {"class_path": "idrecog.callbacks.JsonlWriter", "init_args": {"output_dir": str(out)}}
    trainer = {"logger": False, "callbacks": [writer]}
    path = _classifier_config(tmp_path, data, trainer, {"batch_size": 1, "predict_split": "val"})
    assert idrecog_main(["predict", "--config", str(path), "--ckpt_path", str(ckpt)]) == 0
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    samples = read_manifest(data / "val.jsonl", CAT)
    assert [x["id"] for x in lines] == [s.id for s in samples]  # batch_size 1: every batch written
    assert [x["doc_type"] for x in lines] == [s.doc_type for s in samples]
    for x in lines:
        assert set(x["probs"]) == set(CAT.names)
        assert x["tasks"] == [t for t in CAT.names if x["probs"][t] >= 0.5]


def test_fit_fast_dev_run_with_classifier_resolver(trained, tmp_path: Path) -> None:
    data, ckpt, _ = trained
    config = {
        "trainer": {"accelerator": "cpu", "fast_dev_run": True, "default_root_dir": str(tmp_path / "run")},
        "model": {
            "class_path": "idrecog.lit.unified.UnifiedModule",
            "init_args": {
                "encoder": {
                    "class_path": "idrecog.models.encoder.ViTEncoder",
                    "init_args": {"img_size": list(TINY_SIZE), "depth": 1, "embed_dim": 32, "num_heads": 2},
                },
                "decoder": {
                    "class_path": "idrecog.models.decoder.TaskDecoder",
                    "init_args": {"dim": 32, "depth": 1, "num_heads": 2},
                },
                "interpreter": {
                    "class_path": "idrecog.models.interpreter.TaskGuidedInterpreter",
                    "init_args": {"guidance_hidden": 16},
                },
            },
        },
        "data": {"root": str(data), "img_size": list(TINY_SIZE), "batch_size": 4, "augment": False},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    cache = tmp_path / "cache"
    args = [
        "fit",
        "--config",
        str(path),
        "--data.task_resolver=classifier",
        f"--data.resolver_args={json.dumps({'task_classifier_ckpt': str(ckpt), 'cache_dir': str(cache), 'threshold': 0.5})}",
    ]
    assert idrecog_main(args) == 0
    # the classifier ran for the train and val splits (each has one sample without doc_type) and cached them
    assert {p.name.split("-")[0] for p in cache.glob("*.json")} == {"train", "val"}
    # a missing checkpoint stops the command with a one-line error
    bad = [
        *args[:-1],
        f"--data.resolver_args={json.dumps({'task_classifier_ckpt': str(tmp_path / 'no.ckpt')})}",
    ]
    assert idrecog_main(bad) == 2


def test_samples_from_memory_are_hashed(trained, tmp_path: Path) -> None:
    data, ckpt, _ = trained
    cat = load_catalogue(data / "tasks.yaml")
    samples = read_manifest(data / "val.jsonl", cat)
    mem = [Sample(id=s.id, image=str(data / s.image), labels=s.labels, doc_type=None) for s in samples]
    r = _resolver(ckpt, tmp_path)
    out = r.resolve(mem, "val")
    assert r.last_stats["resolved"] == len(mem) and r.last_stats["cache_hit"] is False
    assert r.resolve(mem, "val") == out and r.last_stats["cache_hit"] is True


def test_recognizer_resolves_images_without_doc_type(trained, tmp_path: Path) -> None:
    from PIL import Image

    from idrecog.data.resolution import TASK_CLASSIFIER
    from idrecog.lit.unified import UnifiedModule
    from idrecog.models.decoder import TaskDecoder
    from idrecog.models.interpreter import TaskGuidedInterpreter
    from idrecog.recognition.recognizer import RecognitionRequest, Recognizer

    data, ckpt, _ = trained
    torch.manual_seed(0)
    module = UnifiedModule(
        encoder=ViTEncoder("vit_tiny_patch16_224", img_size=TINY_SIZE, depth=1, embed_dim=32, num_heads=2),
        decoder=TaskDecoder(dim=32, depth=1, num_heads=2),
        interpreter=TaskGuidedInterpreter(guidance_hidden=16),
    )
    resolver = ClassifierResolver(
        CAT, ckpt, threshold={"hologram": 0.5, "nationality_match": 0.5}, cache_dir=tmp_path
    )
    rec = Recognizer(module, task_resolver=resolver)
    assert str(ckpt) in rec.info()["task_resolver"]  # what `idrecog serve`'s GET /info reports
    s = read_manifest(data / "val.jsonl", CAT)[0]
    image = Image.open(data / s.image).convert("RGB")
    reqs = [
        RecognitionRequest(image=image, id="given", doc_type=s.doc_type),
        RecognitionRequest(image=image, id="none"),
    ]
    given, none = rec.recognize(reqs)
    assert given["tasks"]["how"] != TASK_CLASSIFIER and given["tasks"]["resolved"] == CAT.tasks_for(
        s.doc_type
    )
    expected = resolver.classify_images(rec.make_batch(reqs[1:])["image"])[0]
    assert none["tasks"] == {"resolved": expected, "how": TASK_CLASSIFIER}
    assert set(none["outputs"]) <= set(expected)


def test_recognize_command_uses_the_task_classifier(trained, tmp_path: Path, capsys) -> None:
    """``idrecog recognize --task_resolver {...}``: images without --doc_type get the classifier's task set;
    a missing checkpoint or an unknown argument fails before any model is loaded, naming the flag."""
    from PIL import Image

    from idrecog.data.resolution import TASK_CLASSIFIER
    from idrecog.recognition.recognizer import RecognitionRequest, Recognizer
    from tests.test_recognize import make_tiny_module, save_checkpoint

    data, ckpt, _ = trained
    unified = save_checkpoint(make_tiny_module(), tmp_path / "unified.ckpt")
    image = str(data / read_manifest(data / "val.jsonl", CAT)[0].image)
    spec = json.dumps({"task_classifier_ckpt": str(ckpt), "threshold": {"hologram": 0.99}})
    argv = ["recognize", image, "--ckpt_path", str(unified), "--rules", "none", "--task_resolver", spec]
    assert idrecog_main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip())
    resolver = ClassifierResolver(CAT, ckpt, threshold={"hologram": 0.99}, device="cpu", cache_dir=tmp_path)
    rec = Recognizer.from_checkpoint(unified)
    batch = rec.make_batch([RecognitionRequest(image=Image.open(image).convert("RGB"), id="x")])
    assert record["tasks"] == {
        "resolved": resolver.classify_images(batch["image"])[0],
        "how": TASK_CLASSIFIER,
    }
    assert "hologram" not in record["tasks"]["resolved"]  # its threshold was raised out of reach

    missing = ["--task_resolver", json.dumps({"task_classifier_ckpt": str(tmp_path / "nope.ckpt")})]
    # the unified checkpoint does not exist either: the resolver's error comes first
    assert idrecog_main(["recognize", image, "--ckpt_path", str(tmp_path / "none.ckpt"), *missing]) == 2
    err = capsys.readouterr().err
    assert "--task_resolver.task_classifier_ckpt: checkpoint not found" in err and "nope.ckpt" in err
    # `idrecog serve` checks the same flag the same way, before loading a model or opening a port
    assert idrecog_main(["serve", "--ckpt_path", str(tmp_path / "none.ckpt"), *missing]) == 2
    assert "--task_resolver.task_classifier_ckpt: checkpoint not found" in capsys.readouterr().err
    bad = ["--task_resolver", json.dumps({"task_classifier_ckpt": str(ckpt), "thresold": 0.3})]
    assert idrecog_main(["recognize", image, "--ckpt_path", str(unified), *bad]) == 2
    assert "--task_resolver" in (err := capsys.readouterr().err) and "thresold" in err
