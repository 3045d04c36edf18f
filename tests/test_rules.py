"""Decision rules: crafted outputs give accept / review / reject with reasons; bad rule files name the line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from idrecog.errors import IdrecogError
from idrecog.recognition.rules import RuleError, default_rules_path, load_rules, parse_rules, rule_fields
from idrecog.tasks.catalogue import default_catalogue

CAT = default_catalogue()


def _outputs(**over):
    """Outputs of a clean, genuine ALD id card; keyword arguments replace one task's output (None = did not run)."""
    out = {
        "doc_type": {
            "class": "ald_id_card",
            "probabilities": {c: (0.95 if c == "ald_id_card" else 0.01) for c in CAT["doc_type"].classes},
        },
        "tampering": {
            "class": "genuine",
            "probabilities": {"genuine": 0.9, "portrait_swap": 0.05, "text_edit": 0.05},
        },
        "visibility": {"class": "full", "probabilities": {"full": 0.8, "partial": 0.15, "none": 0.05}},
        "image_quality": {"value": 0.7},
        "card_mask": {
            "mask": None,
            "area_fraction": {"background": 0.4, "document": 0.5, "portrait": 0.05, "mrz": 0.05},
        },
        "fields": {"boxes": [{"box": [1, 2, 30, 40], "label": "portrait", "score": 0.9}]},
        "hologram": {"class": "genuine", "probabilities": {"genuine": 0.8, "counterfeit": 0.2}},
        "nationality_match": {"class": "match", "probabilities": {"match": 0.9, "mismatch": 0.1}},
        "presentation_attack": {"class": "bona_fide", "probabilities": {"bona_fide": 0.95, "attack": 0.05}},
    }
    for k, v in over.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def rules():
    return load_rules(default_rules_path(), CAT)


def test_default_rules_accept_clean_document(rules):
    res = rules.evaluate(_outputs())
    assert res["decision"] == "accept"
    assert res["reasons"] == [] and res["skipped"] == []
    assert set(res["passed"]) == {r.name for r in rules.rules}


def test_tampered_document_is_rejected_with_reason(rules):
    res = rules.evaluate(
        _outputs(
            tampering={
                "class": "portrait_swap",
                "probabilities": {"genuine": 0.2, "portrait_swap": 0.7, "text_edit": 0.1},
            },
            image_quality={"value": 0.1},
        )
    )
    assert res["decision"] == "reject"  # reject outranks the review from the low quality
    by_rule = {r["rule"]: r for r in res["reasons"]}
    assert set(by_rule) == {"not_tampered", "quality"}
    assert by_rule["not_tampered"]["task"] == "tampering"
    assert by_rule["not_tampered"]["field"] == "probabilities.genuine"
    assert by_rule["not_tampered"]["value"] == pytest.approx(0.2)
    assert by_rule["not_tampered"]["expected"] == ">= 0.7"
    assert by_rule["quality"]["outcome"] == "review"


def test_review_on_partial_visibility_and_low_confidence(rules):
    probs = {c: 1 / 6 for c in CAT["doc_type"].classes}
    res = rules.evaluate(
        _outputs(
            visibility={"class": "partial", "probabilities": {"full": 0.3, "partial": 0.6, "none": 0.1}},
            doc_type={"class": "ald_id_card", "probabilities": probs},
        )
    )
    assert res["decision"] == "review"
    assert [r["rule"] for r in res["reasons"]] == ["doc_type_confident", "fully_visible"]
    assert res["reasons"][1]["value"] == "partial"


def test_missing_task_is_skipped_or_fails_as_configured(rules):
    res = rules.evaluate(_outputs(hologram=None))  # BRV id cards have no hologram task
    assert res["decision"] == "accept"
    assert res["skipped"] == [{"rule": "hologram_genuine", "task": "hologram", "why": "task did not run"}]
    res = rules.evaluate(_outputs(tampering=None))  # tampering has if_missing: review
    assert res["decision"] == "review"
    assert res["reasons"][0]["rule"] == "not_tampered" and res["reasons"][0]["value"] is None


def test_detection_and_segmentation_fields():
    rs = parse_rules(
        {
            "rules": [
                {
                    "name": "two_names",
                    "when": {"task": "fields", "field": "count.name", "op": ">=", "value": 2},
                    "else": "reject",
                },
                {
                    "name": "mrz",
                    "when": {"task": "card_mask", "field": "area_fraction.mrz", "op": "<", "value": 0.1},
                },
                {
                    "name": "cls",
                    "when": {"task": "doc_type", "field": "class", "op": "not in", "value": ["cst_passport"]},
                },
            ]
        },
        CAT,
    )
    boxes = [
        {"box": [0, 0, 5, 5], "label": "name", "score": 0.5},
        {"box": [0, 0, 5, 5], "label": "mrz", "score": 0.4},
    ]
    res = rs.evaluate(_outputs(fields={"boxes": boxes}))
    assert res["decision"] == "reject"
    assert res["reasons"] == [
        {
            "rule": "two_names",
            "task": "fields",
            "field": "count.name",
            "value": 1,
            "expected": ">= 2",
            "outcome": "reject",
        }
    ]
    assert res["passed"] == ["mrz", "cls"]


def test_rule_fields_follow_the_task_type():
    assert "probabilities.genuine" in rule_fields(CAT["tampering"])
    assert "area_fraction.portrait" in rule_fields(CAT["card_mask"])
    assert "max_score.hologram" in rule_fields(CAT["fields"])
    assert rule_fields(CAT["image_quality"]) == {"value": "number"}


BAD = {
    "unknown task": ("when: {task: colour, field: class, op: '==', value: red}", 4, "unknown task 'colour'"),
    "unknown field": (
        "when: {task: image_quality, field: class, op: '==', value: x}",
        4,
        "unknown field 'class'",
    ),
    "unknown class in field": (
        "when: {task: tampering, field: probabilities.forged, op: '>=', value: 0.5}",
        4,
        "unknown field 'probabilities.forged'",
    ),
    "order op on a class": (
        "when: {task: visibility, field: class, op: '>=', value: full}",
        4,
        "needs numbers",
    ),
    "number compared with a string": (
        "when: {task: image_quality, field: value, op: '>=', value: high}",
        4,
        "cannot compare it with 'high'",
    ),
    "unknown op": (
        "when: {task: image_quality, field: value, op: '=>', value: 0.5}",
        4,
        "unknown operator '=>'",
    ),
    "value not a class": (
        "when: {task: visibility, field: class, op: '==', value: hidden}",
        4,
        "'hidden' is not a class",
    ),
    "in without a list": (
        "when: {task: visibility, field: class, op: in, value: full}",
        4,
        "needs a non-empty list",
    ),
    "bad else": (
        "when: {task: image_quality, field: value, op: '>', value: 0.5}\n    else: maybe",
        5,
        "'else' must be",
    ),
    "unknown rule key": (
        "when: {task: image_quality, field: value, op: '>', value: 0.5}\n    unless: x",
        5,
        "unknown key",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_rule_file_errors_name_the_line(tmp_path: Path, case: str):
    body, line, needle = BAD[case]
    text = "# my rules\nrules:\n  - name: ok_rule\n    " + body + "\n"
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    with pytest.raises(RuleError) as ei:
        load_rules(p, CAT)
    msg = str(ei.value)
    assert isinstance(ei.value, IdrecogError)
    assert msg.startswith(f"{p}:{line}:"), msg
    assert needle in msg


def test_error_line_points_at_the_offending_rule(tmp_path: Path):
    p = tmp_path / "rules.yaml"
    p.write_text(
        textwrap.dedent(
            """\
            rules:
              - name: a
                when:
                  task: image_quality
                  field: value
                  op: ">="
                  value: 0.5
              - name: b
                when:
                  task: visibility
                  field: class
                  op: "=="
                  value: hidden
            """
        )
    )
    with pytest.raises(RuleError, match=rf"^{p}:13: field 'rules\[1\] \(b\).when.value'"):
        load_rules(p, CAT)


def test_duplicate_name_and_yaml_syntax_errors(tmp_path: Path):
    p = tmp_path / "r.yaml"
    rule = "  - name: a\n    when: {task: image_quality, field: value, op: '>', value: 0.5}\n"
    p.write_text("rules:\n" + rule + rule)
    with pytest.raises(RuleError, match=rf"^{p}:4: .*duplicate rule name 'a'"):
        load_rules(p, CAT)
    p.write_text("rules:\n  - name: [unclosed\n")
    with pytest.raises(RuleError, match=rf"^{p}:\d+: not valid YAML"):
        load_rules(p, CAT)
    p.write_text("rulez: []\n")
    with pytest.raises(RuleError, match=rf"^{p}:1: .*unknown top-level key"):
        load_rules(p, CAT)
