"""Sample manifests: ``DIR/{train,val,test}.jsonl``, one JSON object per line.

Each line: ``id``, ``image`` (path relative to DIR), optional ``doc_type``, ``labels`` {task: value or null},
optional ``assoc`` {``flash``: path, ``angles``: [paths]}, optional ``user`` {``attributes``: {...},
``behaviour``: {...}}. Validation here is of the manifest itself (JSON shape, names, label values); whether
files exist and open is checked by ``idrecog data check`` and at load time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from idrecog.errors import DataFormatError
from idrecog.tasks.catalogue import TaskCatalogue

SPLITS = ("train", "val", "test")
_SAMPLE_KEYS = {"id", "image", "doc_type", "labels", "assoc", "user", "evidence"}


@dataclass
class Sample:
    """One manifest line, validated."""

    id: str
    image: str
    labels: dict[str, Any]
    doc_type: str | None = None
    assoc: dict[str, Any] = field(default_factory=dict)
    user: dict[str, Any] | None = None
    #: {task: [x0, y0, x1, y1]}: where in the image a label's evidence lies (the edited region of a forgery), in
    #: image pixels; optional, for pictures and analysis
    evidence: dict[str, list[float]] = field(default_factory=dict)
    line: int = 0
    source: str = ""

    @property
    def flash(self) -> str | None:
        return self.assoc.get("flash")

    @property
    def angles(self) -> list[str]:
        return list(self.assoc.get("angles") or [])

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "image": self.image}
        if self.doc_type is not None:
            d["doc_type"] = self.doc_type
        d["labels"] = self.labels
        if self.assoc:
            d["assoc"] = self.assoc
        if self.user is not None:
            d["user"] = self.user
        if self.evidence:
            d["evidence"] = self.evidence
        return d


def check_relative_path(value: Any, *, allow_external: bool = False) -> str:
    """A manifest path must be a relative path inside the dataset folder (no '..', not absolute)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty path string, got {value!r}")
    if not allow_external:
        p = PurePosixPath(value.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or (len(value) > 1 and value[1] == ":"):
            raise ValueError(
                f"path {value!r} escapes the dataset folder (absolute or '..'); set allow_external_paths: true to allow it"
            )
    return value


def parse_sample(
    obj: Any,
    catalogue: TaskCatalogue,
    *,
    source: str = "<manifest>",
    line: int = 0,
    allow_external_paths: bool = False,
) -> Sample:
    """Validate one decoded manifest object; raises ``DataFormatError`` naming file, line and field."""
    from idrecog.tasks.registry import create_task_type

    def err(fld: str, msg: str) -> DataFormatError:
        return DataFormatError(msg, file=source, line=line, field=fld)

    if not isinstance(obj, dict):
        raise err("<line>", f"must be a JSON object, got {type(obj).__name__}")
    extra = set(obj) - _SAMPLE_KEYS
    if extra:
        raise err(sorted(extra)[0], f"unknown key; expected {sorted(_SAMPLE_KEYS)}")
    sid = obj.get("id")
    if not isinstance(sid, str | int) or isinstance(sid, bool) or sid == "":
        raise err("id", f"must be a non-empty string, got {sid!r}")
    try:
        image = check_relative_path(obj.get("image"), allow_external=allow_external_paths)
    except ValueError as e:
        raise err("image", str(e)) from None
    doc_type = obj.get("doc_type")
    if doc_type is not None:
        if not isinstance(doc_type, str):
            raise err("doc_type", f"must be a string or absent, got {doc_type!r}")
        if catalogue.doc_types is not None and doc_type not in catalogue.doc_types:
            raise err(
                "doc_type", f"unknown doc type {doc_type!r}; the catalogue has {sorted(catalogue.doc_types)}"
            )
    labels = obj.get("labels", {})
    if not isinstance(labels, dict):
        raise err("labels", "must be an object {task name: value or null}")
    for task, value in labels.items():
        if task not in catalogue:
            raise err(f"labels.{task}", f"unknown task {task!r}; the catalogue has {catalogue.names}")
        if value is None:
            continue
        if isinstance(value, float) and math.isnan(value):
            raise err(f"labels.{task}", "NaN is not a label; use null for a missing label")
        try:
            create_task_type(catalogue[task]).check_label(value)
        except ValueError as e:
            raise err(f"labels.{task}", str(e)) from None
    assoc = obj.get("assoc") or {}
    if not isinstance(assoc, dict) or set(assoc) - {"flash", "angles"}:
        raise err("assoc", "must be an object with optional keys 'flash' (path) and 'angles' (list of paths)")
    if assoc.get("flash") is not None:
        try:
            check_relative_path(assoc["flash"], allow_external=allow_external_paths)
        except ValueError as e:
            raise err("assoc.flash", str(e)) from None
    if assoc.get("angles") is not None:
        if not isinstance(assoc["angles"], list):
            raise err("assoc.angles", "must be a list of paths")
        for j, a in enumerate(assoc["angles"]):
            try:
                check_relative_path(a, allow_external=allow_external_paths)
            except ValueError as e:
                raise err(f"assoc.angles[{j}]", str(e)) from None
    user = obj.get("user")
    if user is not None:
        if not isinstance(user, dict) or set(user) - {"attributes", "behaviour"}:
            raise err("user", "must be an object with optional keys 'attributes' and 'behaviour'")
        attrs = user.get("attributes") or {}
        if not isinstance(attrs, dict) or not all(
            isinstance(v, str | int | bool) or v is None for v in attrs.values()
        ):
            raise err("user.attributes", "must be an object of categorical values (strings)")
        beh = user.get("behaviour") or {}
        if not isinstance(beh, dict):
            raise err("user.behaviour", "must be an object of numbers")
        for k, v in beh.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float | str)):
                raise err(f"user.behaviour.{k}", f"must be a number or a category string, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise err(f"user.behaviour.{k}", f"must be finite, got {v!r}")
    evidence = obj.get("evidence") or {}
    if not isinstance(evidence, dict):
        raise err("evidence", "must be an object {task name: [x0, y0, x1, y1]}")
    for task, box in evidence.items():
        if task not in catalogue:
            raise err(f"evidence.{task}", f"unknown task {task!r}; the catalogue has {catalogue.names}")
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box
            )
            or not (box[0] < box[2] and box[1] < box[3])
        ):
            raise err(
                f"evidence.{task}", f"must be a box [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {box!r}"
            )
    return Sample(
        id=str(sid),
        image=image,
        labels=dict(labels),
        doc_type=doc_type,
        assoc=dict(assoc),
        user=user,
        evidence={k: [float(v) for v in b] for k, b in evidence.items()},
        line=line,
        source=source,
    )


def iter_manifest(
    path: str | Path, catalogue: TaskCatalogue, *, allow_external_paths: bool = False
) -> Iterator[Sample | DataFormatError]:
    """Yield each line's ``Sample``, or its ``DataFormatError`` (so a checker can report every problem)."""
    path = Path(path)
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield DataFormatError(
                    f"not valid JSON: {e.msg} (column {e.colno})", file=path, line=i, field="<line>"
                )
                continue
            try:
                s = parse_sample(
                    obj, catalogue, source=str(path), line=i, allow_external_paths=allow_external_paths
                )
            except DataFormatError as e:
                yield e
                continue
            if s.id in seen:
                yield DataFormatError(
                    f"duplicate id {s.id!r} (first on line {seen[s.id]})", file=path, line=i, field="id"
                )
                continue
            seen[s.id] = i
            yield s


def read_manifest(
    path: str | Path, catalogue: TaskCatalogue, *, allow_external_paths: bool = False
) -> list[Sample]:
    """Read a whole manifest; the first malformed line raises ``DataFormatError``."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError("manifest not found", file=path)
    out = []
    for item in iter_manifest(path, catalogue, allow_external_paths=allow_external_paths):
        if isinstance(item, DataFormatError):
            raise item
        out.append(item)
    return out
