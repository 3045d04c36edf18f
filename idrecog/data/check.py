"""``idrecog data check DIR``: validate a dataset folder and summarise it.

Every manifest line is validated against the catalogue (``iter_manifest`` reports every bad line, not only the
first), then every referenced file: images and frames exist and open (header + ``verify``, no full decode),
each non-null label loads through its task type's ``load_target`` with the image's size (so masks are decoded
and compared with the image size, boxes must lie inside the image, and plug-in task types check their own).
Problems print as ``file:line: field 'x': message``; a summary per doc type and per task follows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from idrecog.data.dataset import frames_available
from idrecog.data.manifest import SPLITS, Sample, iter_manifest
from idrecog.data.resolution import DocTypeResolver
from idrecog.errors import DataFormatError
from idrecog.tasks.catalogue import TaskCatalogue, load_catalogue
from idrecog.tasks.registry import create_task_type


@dataclass
class TaskStats:
    applies: int = 0
    labelled: int = 0
    ignored: int = 0  # labels given for samples the task does not apply to
    frames_missing: int = 0
    #: the task type's own label statistics (``TaskType.new_label_stats``)
    labels: Any = None


@dataclass
class DocTypeStats:
    samples: Counter[str] = field(default_factory=Counter)  # per split
    with_frames: int = 0
    with_user: int = 0


@dataclass
class CheckResult:
    """What ``check_dataset`` found: ``problems`` (each names file, line, field), ``notes`` and the stats."""

    root: Path
    catalogue: TaskCatalogue
    problems: list[DataFormatError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: Counter[str] = field(default_factory=Counter)  # valid lines per split
    lines: Counter[str] = field(default_factory=Counter)  # all lines per split
    tasks: dict[str, TaskStats] = field(default_factory=dict)
    doc_types: dict[str, DocTypeStats] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _open_image(path: Path) -> tuple[int, int]:
    """(H, W) from the header; ``verify`` catches truncated/corrupt PNGs without a full decode."""
    with Image.open(path) as im:
        w, h = im.size
        im.verify()
    return h, w


def _file_problem(e: Exception, path: Path) -> str:
    if isinstance(e, FileNotFoundError):
        return f"file not found: {path}"
    if isinstance(e, UnidentifiedImageError):
        return f"not a readable image: {path}"
    return f"cannot read {path}: {e}"


def check_dataset(
    root: str | Path,
    *,
    splits: Sequence[str] = SPLITS,
    allow_external_paths: bool = False,
    mask_samples: int = 32,
) -> CheckResult:
    """Validate ``root`` (``tasks.yaml`` and the manifests of ``splits``) and collect summary statistics.

    A missing folder or ``tasks.yaml`` (or an invalid catalogue) raises ``DataFormatError``; everything else is
    collected into ``CheckResult.problems``. ``mask_samples``: masks per segmentation task (evenly spread) whose
    class pixel fractions enter the summary (all masks are still decoded and checked).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError("dataset folder not found", file=root)
    catalogue = load_catalogue(root / "tasks.yaml")
    res = CheckResult(root=root, catalogue=catalogue)
    types = {t.name: create_task_type(t) for t in catalogue}
    res.tasks = {n: TaskStats(labels=tt.new_label_stats()) for n, tt in types.items()}
    resolver = DocTypeResolver(catalogue, missing="all")
    found = [s for s in splits if (root / f"{s}.jsonl").is_file()]
    for s in splits:
        if s not in found:
            res.notes.append(f"{s}.jsonl: not present")
    if not found:
        res.problems.append(
            DataFormatError(f"no manifest found ({', '.join(f'{s}.jsonl' for s in splits)})", file=root)
        )
        return res

    for split in found:
        path = root / f"{split}.jsonl"
        samples: list[Sample] = []
        for item in iter_manifest(path, catalogue, allow_external_paths=allow_external_paths):
            res.lines[split] += 1
            if isinstance(item, DataFormatError):
                res.problems.append(item)
            else:
                samples.append(item)
        res.samples[split] = len(samples)
        # the statistics of costly targets (masks) are drawn from every k-th label only
        seg_every = {
            n: max(1, math.ceil(len(samples) / max(1, mask_samples)))
            for n, t in types.items()
            if t.sampled_label_stats
        }
        for sample, applying in zip(samples, resolver.resolve(samples, split), strict=True):
            _check_sample(res, sample, set(applying), types, seg_every, split)
    return res


def _check_sample(
    res: CheckResult,
    s: Sample,
    applying: set[str],
    types: dict[str, Any],
    seg_every: dict[str, int],
    split: str,
) -> None:
    def problem(fld: str, msg: str) -> None:
        res.problems.append(DataFormatError(msg, file=s.source, line=s.line, field=fld))

    dt = res.doc_types.setdefault(s.doc_type or "(none)", DocTypeStats())
    dt.samples[split] += 1
    dt.with_frames += bool(s.flash or s.angles)
    dt.with_user += bool(s.user)

    size: tuple[int, int] | None = None
    try:
        size = _open_image(res.root / s.image)
    except Exception as e:  # any failure to open is a problem to report, not a crash
        problem("image", _file_problem(e, res.root / s.image))
    frames: dict[str, Any] = {"flash": None, "angles": []}
    for fld, rel in [("assoc.flash", s.flash)] + [(f"assoc.angles[{k}]", a) for k, a in enumerate(s.angles)]:
        if rel is None:
            continue
        try:
            _open_image(res.root / rel)
        except Exception as e:
            problem(fld, _file_problem(e, res.root / rel))
            continue
        if fld == "assoc.flash":
            frames["flash"] = rel
        else:
            frames["angles"].append(rel)

    for name, tt in types.items():
        st = res.tasks[name]
        value = s.labels.get(name)
        if name not in applying:
            st.ignored += value is not None
            continue
        st.applies += 1
        if value is None:
            continue
        st.labelled += 1
        spec = tt.spec
        if spec.uses_frames and not frames_available(spec.uses, s.flash, s.angles):
            st.frames_missing += 1
        if size is None:
            continue
        try:
            target = tt.load_target(value, res.root, size)
        except FileNotFoundError as e:
            problem(f"labels.{name}", f"file not found: {e.filename or value}")
            continue
        except (ValueError, OSError) as e:
            problem(f"labels.{name}", str(e))
            continue
        if (st.labelled - 1) % seg_every.get(name, 1) == 0:
            st.labels = tt.add_label_stats(st.labels, value, target)


# ---------------------------------------------------------------------- report
def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(res: CheckResult) -> str:
    """Problems (one a line), notes, the per-doc-type and per-task tables and a verdict line."""
    out = [str(p) for p in res.problems]
    if res.problems:
        out.append("")
    out += [f"note: {n}" for n in res.notes]
    splits = [s for s in SPLITS if s in res.lines]
    out.append(
        f"dataset {res.root}: "
        + ", ".join(f"{s} {res.samples[s]}/{res.lines[s]} valid lines" for s in splits)
    )
    if res.doc_types:
        rows = [["doc_type", *splits, "with frames", "with user"]]
        for name in sorted(res.doc_types):
            d = res.doc_types[name]
            n = sum(d.samples.values()) or 1
            rows.append(
                [
                    name,
                    *(str(d.samples.get(s, 0)) for s in splits),
                    f"{d.with_frames / n:.0%}",
                    f"{d.with_user / n:.0%}",
                ]
            )
        out += ["", _table(rows)]
    rows = [["task", "type", "samples", "labelled", "stats"]]
    notes = []
    for t in res.catalogue:
        st = res.tasks[t.name]
        tt = create_task_type(t)
        rows.append(
            [
                t.name,
                t.type,
                str(st.applies),
                f"{st.labelled / st.applies:.0%}" if st.applies else "-",
                tt.format_label_stats(st.labels, st.labelled),
            ]
        )
        if st.frames_missing:
            notes.append(f"{t.name}: {st.frames_missing} labelled samples lack frames (masked in training)")
        if st.ignored:
            notes.append(
                f"{t.name}: {st.ignored} labels on samples whose doc type it does not apply to (ignored)"
            )
    out += ["", _table(rows)]
    out += [f"note: {n}" for n in notes]
    n = sum(res.lines.values())
    out.append("")
    out.append(
        f"{len(res.problems)} problem(s) in {n} lines" if res.problems else f"OK: {n} lines, no problems"
    )
    return "\n".join(out)


def run_check(
    root: str | Path,
    *,
    splits: Sequence[str] = SPLITS,
    allow_external_paths: bool = False,
    mask_samples: int = 32,
) -> int:
    """Check and print; exit code 1 when any problem was found, 0 otherwise."""
    res = check_dataset(
        root, splits=splits, allow_external_paths=allow_external_paths, mask_samples=mask_samples
    )
    print(format_report(res))
    return 0 if res.ok else 1
