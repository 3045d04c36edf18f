"""The catalogue and manifest parsers: valid input round-trips, bad input gives DataFormatError naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idrecog.data.manifest import iter_manifest, parse_sample, read_manifest
from idrecog.errors import DataFormatError
from idrecog.tasks.catalogue import TaskCatalogue, default_catalogue, load_catalogue


def _good_sample() -> dict:
    return {
        "id": "s1",
        "image": "images/train/s1.jpg",
        "doc_type": "ald_passport",
        "labels": {
            "doc_type": "ald_passport",
            "tampering": "genuine",
            "image_quality": 0.7,
            "card_mask": "masks/train/s1.png",
            "fields": [{"box": [1, 2, 30, 40], "label": "portrait"}],
            "hologram": None,
        },
        "assoc": {"flash": "frames/train/s1_flash.jpg", "angles": ["frames/train/s1_a0.jpg"]},
        "user": {"attributes": {"nationality": "ALD"}, "behaviour": {"attempts": 1, "seconds": 3.5}},
    }


def test_default_catalogue_round_trips(tmp_path: Path) -> None:
    cat = default_catalogue()
    assert {
        "doc_type",
        "tampering",
        "visibility",
        "image_quality",
        "card_mask",
        "fields",
        "hologram",
        "nationality_match",
    } <= set(cat.names)
    assert cat["hologram"].uses_frames and cat["nationality_match"].uses_user
    assert "hologram" not in cat.tasks_for("brv_id_card")
    cat.to_yaml(tmp_path / "tasks.yaml")
    again = load_catalogue(tmp_path / "tasks.yaml")
    assert again.to_dict() == cat.to_dict()
    assert cat.diff(again) == []


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["tasks"][0].update(type="nonsense"), "tasks[0] (doc_type).type"),
        (lambda d: d["tasks"][3].pop("range"), "tasks[3] (image_quality)"),
        (lambda d: d["tasks"][1].update(classes=["only_one"]), "tasks[1] (tampering)"),
        (lambda d: d["tasks"][6].update(frames="triple"), "tasks[6] (hologram).frames"),
        (lambda d: d["tasks"][6].update(uses=["smell"]), "tasks[6] (hologram).uses"),
        (lambda d: d["doc_types"]["ald_passport"].append("ghost_task"), "doc_types.ald_passport"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["tasks"].append(dict(d["tasks"][0])), f"tasks[{len(default_catalogue())}].name"),
    ],
)
def test_catalogue_errors_name_the_field(tmp_path: Path, mutate, field: str) -> None:
    d = default_catalogue().to_dict()
    mutate(d)
    p = tmp_path / "tasks.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(DataFormatError) as e:
        load_catalogue(p)
    assert str(p) in str(e.value) and field in str(e.value)


def test_sample_parses_and_round_trips() -> None:
    cat = default_catalogue()
    s = parse_sample(_good_sample(), cat, source="m.jsonl", line=1)
    assert s.flash == "frames/train/s1_flash.jpg" and s.angles == ["frames/train/s1_a0.jpg"]
    assert parse_sample(s.to_json(), cat).to_json() == s.to_json()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["labels"].update(tampering="forged"), "labels.tampering"),
        (lambda d: d["labels"].update(image_quality=1.5), "labels.image_quality"),
        (lambda d: d["labels"].update(image_quality=float("nan")), "labels.image_quality"),
        (lambda d: d["labels"].update(fields=[{"box": [10, 10, 5, 20], "label": "name"}]), "labels.fields"),
        (lambda d: d["labels"].update(fields=[{"box": [1, 1, 5, 5], "label": "tattoo"}]), "labels.fields"),
        (lambda d: d["labels"].update(ghost=1), "labels.ghost"),
        (lambda d: d.update(doc_type="martian_passport"), "doc_type"),
        (lambda d: d.update(image="../../etc/passwd"), "image"),
        (lambda d: d.update(image="/abs/path.jpg"), "image"),
        (lambda d: d["assoc"].update(angles=["../x.jpg"]), "assoc.angles[0]"),
        (lambda d: d.update(colour="red"), "colour"),
    ],
)
def test_sample_errors_name_file_line_field(mutate, field: str) -> None:
    d = _good_sample()
    mutate(d)
    with pytest.raises(DataFormatError) as e:
        parse_sample(d, default_catalogue(), source="d/train.jsonl", line=7)
    assert e.value.file == "d/train.jsonl" and e.value.line == 7 and e.value.field == field
    assert str(e.value).startswith("d/train.jsonl:7: field ")


def test_external_paths_allowed_when_asked() -> None:
    d = _good_sample()
    d["image"] = "/elsewhere/img.jpg"
    assert parse_sample(d, default_catalogue(), allow_external_paths=True).image == "/elsewhere/img.jpg"


def test_manifest_reports_every_bad_line(tmp_path: Path) -> None:
    good = _good_sample()
    lines = [json.dumps(good), "{not json", json.dumps({**good, "id": "s2", "doc_type": 3}), json.dumps(good)]
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n")
    items = list(iter_manifest(p, default_catalogue()))
    errors = [i for i in items if isinstance(i, DataFormatError)]
    assert [e.line for e in errors] == [2, 3, 4]  # bad JSON, bad doc_type, duplicate id
    assert "duplicate id" in str(errors[2])
    with pytest.raises(DataFormatError, match=r"train.jsonl:2: field '<line>'"):
        read_manifest(p, default_catalogue())


# -- property-based fuzzing: the parsers raise only DataFormatError, never crash -------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=5),
    max_leaves=20,
)


def _sample_like() -> st.SearchStrategy:
    keys = st.sampled_from(["id", "image", "doc_type", "labels", "assoc", "user", "other"])
    label_keys = st.sampled_from([*default_catalogue().names, "ghost"])
    labels = st.dictionaries(label_keys, _json, max_size=6)
    return st.dictionaries(keys, _json | labels, max_size=7)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json | _sample_like())
def test_fuzz_sample_parser(obj) -> None:
    try:
        parse_sample(obj, default_catalogue(), source="f.jsonl", line=1)
    except DataFormatError as e:
        assert e.file == "f.jsonl" and e.line == 1


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _json
    | st.fixed_dictionaries(
        {
            "tasks": st.lists(
                st.dictionaries(
                    st.sampled_from(
                        ["name", "type", "classes", "range", "query_text", "frames", "uses", "bad"]
                    ),
                    _json,
                    max_size=6,
                ),
                max_size=4,
            )
        },
        optional={"doc_types": _json},
    )
)
def test_fuzz_catalogue_parser(data) -> None:
    try:
        cat = TaskCatalogue.from_dict(data, source="tasks.yaml")
    except DataFormatError as e:
        assert e.file == "tasks.yaml"
    else:
        assert len(cat) >= 1
