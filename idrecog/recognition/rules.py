"""Decision rules: the recognition result (accept / review / reject) decided from task outputs, as DATA.

A rule file (``lightning_configs/rules/default.yaml``, documented in ``docs/recognition.md``)::

    rules:
      - name: doc_type_confident
        when: {task: doc_type, field: confidence, op: ">=", value: 0.8}
        else: review                    # the outcome when the condition does not hold
      - name: hologram_genuine
        when: {task: hologram, field: class, op: "==", value: genuine}
        else: reject
        if_missing: skip                # skip (default) | review | reject: when the task did not run

The decision is ``accept`` when every evaluated rule holds; otherwise the most severe failed outcome, with the
fixed precedence ``reject > review > accept``. Rules are validated against a task catalogue when loaded:
unknown task, unknown field for the task's type and classes, or a comparison that cannot work raise
:class:`RuleError` naming the file and the line.

Fields per task type, as each type declares them (``TaskType.rule_fields`` / ``rule_value``; a plugin type
declares its own):

* classification: ``class`` (a class name), ``confidence`` (max probability), ``probabilities.<class>``
* regression: ``value``
* segmentation: ``area_fraction.<class>``
* detection: ``count``, ``count.<label>``, ``max_score.<label>``
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from idrecog.errors import DataFormatError
from idrecog.tasks.base import CLASS, NUMBER
from idrecog.tasks.catalogue import TaskCatalogue, TaskSpec
from idrecog.tasks.registry import get_task_type_class

OUTCOMES = ("accept", "review", "reject")
#: outcome severity: the decision is the most severe outcome among failed rules
SEVERITY = {"accept": 0, "review": 1, "reject": 2}
IF_MISSING = ("skip", "review", "reject")

_ORDER_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_EQ_OPS: dict[str, Callable[[Any, Any], bool]] = {"==": operator.eq, "!=": operator.ne}
_SET_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {**_EQ_OPS, **_ORDER_OPS, **_SET_OPS}

_TOP_KEYS = {"rules", "description"}
_RULE_KEYS = {"name", "when", "else", "if_missing", "description"}
_WHEN_KEYS = {"task", "field", "op", "value"}


class RuleError(DataFormatError):
    """A rule file is wrong; the message names the file, the line and the field."""


# ------------------------------------------------------------------------------------------------ fields
def rule_fields(spec: TaskSpec) -> dict[str, str]:
    """The fields a rule may test for a task: ``{field: "number" | "class"}``, as its task type declares them
    (:meth:`idrecog.tasks.TaskType.rule_fields`).

    >>> from idrecog.tasks.catalogue import TaskSpec
    >>> sorted(rule_fields(TaskSpec("q", "regression", range=(0.0, 1.0))))
    ['value']
    """
    return dict(get_task_type_class(spec.type).rule_fields(spec))


def rule_value(spec: TaskSpec, output: Mapping[str, Any], field: str) -> Any:
    """Read ``field`` from one task's postprocessed output; ``KeyError`` when the output lacks it."""
    return get_task_type_class(spec.type).rule_value(spec, output, field)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    """One validated rule; ``line`` is where it starts in its file (0 when built from a dict)."""

    name: str
    task: str
    field: str
    op: str
    value: Any
    outcome: str = "review"
    if_missing: str = "skip"
    line: int = 0

    @property
    def expected(self) -> str:
        return f"{self.op} {self.value!r}" if isinstance(self.value, str) else f"{self.op} {self.value}"

    def holds(self, actual: Any) -> bool:
        return OPERATORS[self.op](actual, self.value)


@dataclass
class RuleSet:
    """Validated rules for one catalogue. ``evaluate`` turns per-task outputs into a recognition result."""

    rules: list[Rule]
    catalogue: TaskCatalogue
    source: str = "<rules>"

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in self.rules))

    def evaluate(self, outputs: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
        """outputs: {task: postprocessed output}; a task absent (or None) did not run for this document.

        Returns ``{"decision", "reasons": [{rule, task, field, value, expected, outcome}], "passed": [rule],
        "skipped": [{rule, task, why}]}``; ``reasons`` lists every failed rule in file order.
        """
        reasons: list[dict[str, Any]] = []
        passed: list[str] = []
        skipped: list[dict[str, Any]] = []
        for r in self.rules:
            out = outputs.get(r.task)
            if out is None:
                if r.if_missing == "skip":
                    skipped.append({"rule": r.name, "task": r.task, "why": "task did not run"})
                else:
                    reasons.append(self._reason(r, None, r.if_missing, "task did not run"))
                continue
            try:
                actual = rule_value(self.catalogue[r.task], out, r.field)
            except (KeyError, TypeError, ValueError):
                reasons.append(self._reason(r, None, r.outcome, "field missing from the task output"))
                continue
            if _is_number(actual) and not isinstance(actual, int):
                actual = float(actual)
            try:
                ok = r.holds(actual)
            except TypeError:
                ok = False
            if ok:
                passed.append(r.name)
            else:
                reasons.append(self._reason(r, actual, r.outcome))
        decision = max((x["outcome"] for x in reasons), key=SEVERITY.__getitem__, default="accept")
        return {"decision": decision, "reasons": reasons, "passed": passed, "skipped": skipped}

    @staticmethod
    def _reason(r: Rule, value: Any, outcome: str, note: str | None = None) -> dict[str, Any]:
        d = {
            "rule": r.name,
            "task": r.task,
            "field": r.field,
            "value": value,
            "expected": r.expected,
            "outcome": outcome,
        }
        if note:
            d["note"] = note
        return d


# ------------------------------------------------------------------------------------------------ loading
class _Lines:
    """Line numbers (1-based) of the nodes of a composed YAML document, looked up by key path."""

    def __init__(self, node: yaml.Node | None) -> None:
        self.node = node

    def _walk(self, path: Iterable[str | int], key: bool) -> yaml.Node | None:
        node = self.node
        path = list(path)
        for i, p in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == p:
                        node = k if (key and last) else v
                        break
                else:
                    return node
            elif isinstance(node, yaml.SequenceNode) and isinstance(p, int) and p < len(node.value):
                node = node.value[p]
            else:
                return node
        return node

    def line(self, *path: str | int, key: bool = False) -> int | None:
        node = self._walk(path, key)
        return None if node is None else node.start_mark.line + 1


def load_rules(path: str | Path, catalogue: TaskCatalogue) -> RuleSet:
    """Read and validate a rule file against ``catalogue``; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise RuleError("rule file not found", file=path)
    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RuleError(
            f"not valid YAML: {getattr(e, 'problem', e)}",
            file=path,
            line=None if mark is None else mark.line + 1,
        ) from None
    finally:
        loader.dispose()
    return parse_rules(data, catalogue, source=str(path), lines=_Lines(node))


def parse_rules(
    data: Any, catalogue: TaskCatalogue, *, source: str = "<rules>", lines: _Lines | None = None
) -> RuleSet:
    """Validate decoded rules (a dict like the YAML file's) against ``catalogue``."""
    lines = lines or _Lines(None)

    def err(msg: str, *path: str | int, key: bool = False, field: str | None = None) -> RuleError:
        return RuleError(msg, file=source, line=lines.line(*path, key=key), field=field)

    if not isinstance(data, Mapping):
        raise err("must be a mapping with a 'rules' list")
    extra = sorted(set(data) - _TOP_KEYS)
    if extra:
        raise err(f"unknown top-level key; expected {sorted(_TOP_KEYS)}", extra[0], key=True, field=extra[0])
    raw = data.get("rules")
    if not isinstance(raw, list):
        raise err("'rules' must be a list of rules", "rules", field="rules")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, r in enumerate(raw):
        fld = f"rules[{i}]"
        if not isinstance(r, Mapping):
            raise err("a rule must be a mapping with 'name', 'when' and 'else'", "rules", i, field=fld)
        extra = sorted(set(r) - _RULE_KEYS)
        if extra:
            raise err(
                f"unknown key; expected one of {sorted(_RULE_KEYS)}",
                "rules",
                i,
                extra[0],
                key=True,
                field=f"{fld}.{extra[0]}",
            )
        name = r.get("name")
        if not isinstance(name, str) or not name:
            raise err(
                f"needs a non-empty string 'name', got {name!r}", "rules", i, "name", field=f"{fld}.name"
            )
        if name in seen:
            raise err(f"duplicate rule name {name!r}", "rules", i, "name", field=f"{fld}.name")
        seen.add(name)
        fld = f"rules[{i}] ({name})"
        outcome = r.get("else", "review")
        if outcome not in ("review", "reject"):
            raise err(
                f"'else' must be 'review' or 'reject', got {outcome!r}",
                "rules",
                i,
                "else",
                field=f"{fld}.else",
            )
        if_missing = r.get("if_missing", "skip")
        if if_missing not in IF_MISSING:
            raise err(
                f"'if_missing' must be one of {list(IF_MISSING)}, got {if_missing!r}",
                "rules",
                i,
                "if_missing",
                field=f"{fld}.if_missing",
            )
        when = r.get("when")
        if not isinstance(when, Mapping):
            raise err(
                "'when' must be a mapping {task, field, op, value}", "rules", i, "when", field=f"{fld}.when"
            )
        extra = sorted(set(when) - _WHEN_KEYS)
        missing = sorted(_WHEN_KEYS - set(when))
        if extra:
            raise err(
                f"unknown key; expected {sorted(_WHEN_KEYS)}",
                "rules",
                i,
                "when",
                extra[0],
                key=True,
                field=f"{fld}.when.{extra[0]}",
            )
        if missing:
            raise err(f"'when' lacks {missing}", "rules", i, "when", field=f"{fld}.when.{missing[0]}")
        task, fname, op, value = when["task"], when["field"], when["op"], when["value"]
        at = ("rules", i, "when")
        if not isinstance(task, str) or task not in catalogue:
            raise err(
                f"unknown task {task!r}; the catalogue ({catalogue.source}) has: {', '.join(catalogue.names)}",
                *at,
                "task",
                field=f"{fld}.when.task",
            )
        fields = rule_fields(catalogue[task])
        if not isinstance(fname, str) or fname not in fields:
            raise err(
                f"unknown field {fname!r} for task {task!r} ({catalogue[task].type}); valid: {', '.join(fields) or 'none'}",
                *at,
                "field",
                field=f"{fld}.when.field",
            )
        if not isinstance(op, str) or op not in OPERATORS:
            raise err(
                f"unknown operator {op!r}; valid: {', '.join(OPERATORS)}", *at, "op", field=f"{fld}.when.op"
            )
        problem = _check_comparison(fields[fname], op, value, catalogue[task], fname)
        if problem:
            raise err(problem, *at, "value", field=f"{fld}.when.value")
        rules.append(
            Rule(
                name=name,
                task=task,
                field=fname,
                op=op,
                value=list(value) if isinstance(value, list) else value,
                outcome=outcome,
                if_missing=if_missing,
                line=lines.line("rules", i) or 0,
            )
        )
    return RuleSet(rules=rules, catalogue=catalogue, source=source)


def _check_comparison(kind: str, op: str, value: Any, spec: TaskSpec, fname: str) -> str | None:
    """Why ``<field> <op> <value>`` cannot work for this field, or None when it can."""
    if op in _SET_OPS:
        if not isinstance(value, list) or not value:
            return f"operator {op!r} needs a non-empty list value, got {value!r}"
        items = value
    else:
        if isinstance(value, list):
            return f"operator {op!r} needs a single value, got a list (use 'in' / 'not in')"
        items = [value]
    if kind == NUMBER:
        bad = [v for v in items if not _is_number(v)]
        if bad:
            return f"field {fname!r} is a number; cannot compare it with {bad[0]!r} using {op!r}"
        return None
    if kind == CLASS:
        if op in _ORDER_OPS:
            return f"field {fname!r} is a class name; operator {op!r} needs numbers (use ==, !=, in, not in)"
        classes = list(spec.classes or ())
        bad = [v for v in items if v not in classes]
        if bad:
            return f"{bad[0]!r} is not a class of task {spec.name!r}; classes: {', '.join(classes)}"
        return None
    return None


def default_rules_path() -> Path:
    """The shipped rule file, ``lightning_configs/rules/default.yaml`` of the source tree."""
    return Path(__file__).resolve().parents[2] / "lightning_configs" / "rules" / "default.yaml"
