"""The task catalogue: which tasks exist, their types and classes, and which apply to which document type.

Format (``DIR/tasks.yaml``), documented in ``docs/data-format.md``::

    tasks:
      - name: tampering
        type: classification            # a registered task type (idrecog.tasks.list_task_types())
        classes: [genuine, portrait_swap, text_edit]
        query_text: Has the document been tampered with?
        frames: single                  # single | multi
        uses: []                        # subset of [flash, angles, user]
        requires: []                    # what of uses the task cannot be answered without: an input, or one
                                        # part of the user information (user.attributes, user.behaviour)
      - name: image_quality
        type: regression
        range: [0.0, 1.0]
        ...
    doc_types:                          # optional; without it every task applies to every sample
      xa_id_card: [doc_type, tampering, image_quality]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idrecog.errors import ConfigError, DataFormatError

FRAME_KINDS = ("single", "multi")
USES = ("flash", "angles", "user")
#: the parts of the user information a task can require on its own (``requires: [user.attributes]``)
USER_PARTS = ("attributes", "behaviour")


def input_of(requirement: str) -> str:
    """The input a ``requires`` entry belongs to: ``user.attributes`` -> ``user``, ``flash`` -> ``flash``."""
    return requirement.split(".", 1)[0]


_TASK_KEYS = {"name", "type", "classes", "range", "query_text", "frames", "uses", "requires", "options"}


@dataclass(frozen=True)
class TaskSpec:
    """One task of the catalogue."""

    name: str
    type: str
    classes: tuple[str, ...] | None = None
    range: tuple[float, float] | None = None
    query_text: str = ""
    frames: str = "single"
    uses: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    #: the inputs of ``uses`` without which the task cannot be answered (its label depends on them, not on the
    #: main image), or a part of the user information (``user.attributes``: the nationality check needs the
    #: declared nationality, not the behaviour): a model whose queries read none of them is not scored on the task
    requires: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes or ())

    def class_index(self, name: str) -> int:
        assert self.classes is not None
        return self.classes.index(name)

    @property
    def uses_frames(self) -> bool:
        return self.frames == "multi" and bool({"flash", "angles"} & set(self.uses))

    @property
    def uses_user(self) -> bool:
        return "user" in self.uses

    @property
    def required_user_parts(self) -> tuple[str, ...]:
        """The parts of the user information the task requires on their own (``requires: [user.attributes]``)."""
        return tuple(r.split(".", 1)[1] for r in self.requires if r.startswith("user."))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.classes is not None:
            d["classes"] = list(self.classes)
        if self.range is not None:
            d["range"] = list(self.range)
        d["query_text"] = self.query_text
        d["frames"] = self.frames
        d["uses"] = list(self.uses)
        if self.requires:
            d["requires"] = list(self.requires)
        if self.options:
            d["options"] = dict(self.options)
        return d


@dataclass
class TaskCatalogue:
    """The list of tasks and the optional doc-type -> tasks mapping."""

    tasks: list[TaskSpec]
    doc_types: dict[str, list[str]] | None = None
    source: str = "<catalogue>"

    def __post_init__(self) -> None:
        self._index = {t.name: i for i, t in enumerate(self.tasks)}

    # -- look-ups -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> TaskSpec:
        try:
            return self.tasks[self._index[name]]
        except KeyError:
            raise KeyError(f"unknown task {name!r}; the catalogue has: {', '.join(self.names)}") from None

    def index(self, name: str) -> int:
        return self._index[name]

    def tasks_for(self, doc_type: str | None) -> list[str]:
        """Names of the tasks that apply to a document type (all tasks without a ``doc_types`` mapping)."""
        if self.doc_types is None or doc_type is None:
            return self.names
        return list(self.doc_types[doc_type])

    @property
    def doc_type_task(self) -> str | None:
        """The task whose predicted class names a doc type (a doc-type classifier: its type ``predicts_class`` and
        its classes are among the ``doc_types``), if any."""
        from idrecog.tasks.registry import get_task_type_class

        if not self.doc_types:
            return None
        for spec in self.tasks:
            if (
                spec.classes
                and set(spec.classes) <= set(self.doc_types)
                and get_task_type_class(spec.type).predicts_class
            ):
                return spec.name
        return None

    def types(self) -> list[str]:
        """Distinct task types in catalogue order."""
        return list(dict.fromkeys(t.type for t in self.tasks))

    def fingerprint(self) -> dict[str, Any]:
        """What must match between a checkpoint and a catalogue: task names, types and classes."""
        return {t.name: {"type": t.type, "classes": list(t.classes or [])} for t in self.tasks}

    def diff(self, other: TaskCatalogue) -> list[str]:
        """Human-readable differences in names, types and classes (empty when compatible)."""
        a, b = self.fingerprint(), other.fingerprint()
        out = [f"task {n!r} only in {self.source}" for n in a if n not in b]
        out += [f"task {n!r} only in {other.source}" for n in b if n not in a]
        for n in a:
            if n in b and a[n] != b[n]:
                out.append(f"task {n!r}: {a[n]} in {self.source} vs {b[n]} in {other.source}")
        return out

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tasks": [t.to_dict() for t in self.tasks]}
        if self.doc_types is not None:
            d["doc_types"] = {k: list(v) for k, v in self.doc_types.items()}
        return d

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<catalogue>") -> TaskCatalogue:
        return _parse(data, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TaskCatalogue:
        return load_catalogue(path)


def coerce_catalogue(value: TaskCatalogue | Mapping[str, Any] | str | Path) -> TaskCatalogue:
    """Accept a catalogue object, its dict form (as stored in checkpoints) or a path to ``tasks.yaml``."""
    if isinstance(value, TaskCatalogue):
        return value
    if isinstance(value, Mapping):
        return TaskCatalogue.from_dict(value)
    p = Path(value)
    return load_catalogue(p / "tasks.yaml" if p.is_dir() else p)


def load_catalogue(path: str | Path) -> TaskCatalogue:
    """Read and validate ``tasks.yaml``; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError("task catalogue not found", file=path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise DataFormatError(
            f"not valid YAML: {e}", file=path, line=None if line is None else line + 1
        ) from None
    return _parse(data, str(path))


def _err(source: str, field_: str, msg: str) -> DataFormatError:
    return DataFormatError(msg, file=source, field=field_)


def _str_list(value: Any, source: str, fld: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _err(source, fld, f"must be a list of non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise _err(source, fld, f"has duplicates: {value!r}")
    return value


def _parse(data: Any, source: str) -> TaskCatalogue:
    from idrecog.tasks.registry import get_task_type_class

    if not isinstance(data, Mapping):
        raise _err(source, "<root>", "must be a mapping with a 'tasks' list")
    unknown = set(data) - {"tasks", "doc_types"}
    if unknown:
        raise _err(
            source, sorted(unknown)[0], "unknown top-level key; expected 'tasks' and optional 'doc_types'"
        )
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise _err(source, "tasks", "must be a non-empty list")
    tasks: list[TaskSpec] = []
    seen: set[str] = set()
    for i, t in enumerate(raw_tasks):
        fld = f"tasks[{i}]"
        if not isinstance(t, Mapping):
            raise _err(source, fld, "must be a mapping")
        extra = set(t) - _TASK_KEYS
        if extra:
            raise _err(
                source, f"{fld}.{sorted(extra)[0]}", f"unknown key; expected one of {sorted(_TASK_KEYS)}"
            )
        name = t.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise _err(source, f"{fld}.name", f"must be an identifier-like string, got {name!r}")
        if name in seen:
            raise _err(source, f"{fld}.name", f"duplicate task name {name!r}")
        seen.add(name)
        fld = f"tasks[{i}] ({name})"
        ttype = t.get("type")
        if not isinstance(ttype, str):
            raise _err(source, f"{fld}.type", f"must be a task type name, got {ttype!r}")
        try:
            type_cls = get_task_type_class(ttype)
        except ConfigError as e:
            raise _err(source, f"{fld}.type", str(e)) from None
        frames = t.get("frames", "single")
        if frames not in FRAME_KINDS:
            raise _err(source, f"{fld}.frames", f"must be one of {FRAME_KINDS}, got {frames!r}")
        uses = t.get("uses", []) or []
        if not isinstance(uses, list) or any(u not in USES for u in uses):
            raise _err(source, f"{fld}.uses", f"must be a list drawn from {USES}, got {uses!r}")
        requires = t.get("requires", []) or []
        allowed = [*uses, *(f"user.{p}" for p in USER_PARTS if "user" in uses)]
        if not isinstance(requires, list) or any(r not in allowed for r in requires):
            raise _err(
                source,
                f"{fld}.requires",
                f"must be a list drawn from the task's uses and the parts of what it uses {allowed!r}, "
                f"got {requires!r}",
            )
        query_text = t.get("query_text", "")
        if not isinstance(query_text, str):
            raise _err(source, f"{fld}.query_text", "must be a string")
        options = t.get("options", {}) or {}
        if not isinstance(options, Mapping):
            raise _err(source, f"{fld}.options", "must be a mapping")
        classes = None
        if "classes" in t:
            classes = tuple(_str_list(t["classes"], source, f"{fld}.classes"))
        rng = None
        if "range" in t:
            r = t["range"]
            if (
                not isinstance(r, list)
                or len(r) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in r)
                or not r[0] < r[1]
            ):
                raise _err(source, f"{fld}.range", f"must be [low, high] numbers with low < high, got {r!r}")
            rng = (float(r[0]), float(r[1]))
        spec = TaskSpec(
            name=name,
            type=ttype,
            classes=classes,
            range=rng,
            query_text=query_text or name.replace("_", " "),
            frames=frames,
            uses=tuple(uses),
            options=dict(options),
            requires=tuple(requires),
        )
        try:
            type_cls.validate_spec(spec)
        except ValueError as e:
            raise _err(source, fld, str(e)) from None
        tasks.append(spec)

    doc_types = None
    if data.get("doc_types") is not None:
        raw = data["doc_types"]
        if not isinstance(raw, Mapping) or not raw:
            raise _err(source, "doc_types", "must be a non-empty mapping of doc type -> list of task names")
        doc_types = {}
        for dt, names in raw.items():
            names = _str_list(names, source, f"doc_types.{dt}")
            for n in names:
                if n not in seen:
                    raise _err(
                        source, f"doc_types.{dt}", f"names task {n!r}, which is not defined under 'tasks'"
                    )
            doc_types[str(dt)] = list(names)
    return TaskCatalogue(tasks=tasks, doc_types=doc_types, source=source)


def default_catalogue() -> TaskCatalogue:
    """The catalogue of the built-in synthetic benchmark (the file ``idrecog synth`` writes)."""
    from importlib.resources import files

    text = files("idrecog").joinpath("configs/synthetic_tasks.yaml").read_text()
    return TaskCatalogue.from_dict(yaml.safe_load(text), source="idrecog/configs/synthetic_tasks.yaml")
