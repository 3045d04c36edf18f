"""Pre-flight scan: the validation of ``idrecog data check`` run before the first training step, cached on disk.

The scan reads every manifest line and every file it references (images, frames, masks), so on a large
dataset it costs minutes; its result is cached under ``cache_dir`` keyed by the SHA-256 of the catalogue and of
the manifest's bytes (and the path policy), so a second run over unchanged manifests is instant. A file that
is corrupted after the scan is not seen by the key: ``on_error: skip`` then drops that sample at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from idrecog.data.manifest import Sample, iter_manifest, read_manifest
from idrecog.errors import DataFormatError
from idrecog.tasks.catalogue import TaskCatalogue

__all__ = [
    "PREFLIGHT_VERSION",
    "PreflightResult",
    "SplitReader",
    "classify_problem",
    "default_cache_dir",
    "preflight_scan",
]

PREFLIGHT_VERSION = 1  # bump when the checks change, so old cache entries are not trusted


def default_cache_dir() -> Path:
    """``$IDRECOG_CACHE/preflight`` or ``~/.cache/idrecog/preflight`` (the dataset folder may be read-only)."""
    base = os.environ.get("IDRECOG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "idrecog")
    return Path(base) / "preflight"


def classify_problem(e: DataFormatError) -> str:
    """A short reason for a problem, used to count skipped samples (``missing_file``, ``corrupt_image``...)."""
    fld, msg = e.field or "", e.message
    if fld == "<line>":
        return "bad_json"
    if "not found" in msg or "No such file" in msg:
        return "missing_frame" if fld.startswith("assoc.") else "missing_file"
    if "decompression bomb" in msg.lower() or "exceeds limit" in msg:
        return "image_too_large"
    if fld in ("image",) or fld.startswith("assoc."):
        return (
            "escaping_path"
            if "escapes the dataset folder" in msg
            else ("corrupt_frame" if fld.startswith("assoc.") else "corrupt_image")
        )
    if fld == "doc_type":
        return "unknown_doc_type"
    if fld.startswith("labels."):
        if "unknown task" in msg:
            return "unknown_task"
        if "is not one of" in msg:
            return "unknown_class"
        if "outside the image" in msg or "non-positive width" in msg or ".box" in msg:
            return "bad_box"
        if "mask size" in msg:
            return "mask_size"
        if "NaN" in msg or "finite number" in msg or "outside the range" in msg:
            return "bad_regression_value"
        if "cannot" in msg or "mask must be" in msg or "class index" in msg:
            return "bad_mask"
        return "bad_label"
    if fld == "id":
        return "bad_id"
    return "other"


@dataclass
class PreflightResult:
    """Problems of one split: ``problems`` (DataFormatError, each naming file, line, field) and the bad lines."""

    split: str
    lines: int = 0
    problems: list[DataFormatError] = field(default_factory=list)
    cached: bool = False

    @property
    def bad_lines(self) -> dict[int, str]:
        """{1-based line: reason of its first problem}."""
        out: dict[int, str] = {}
        for p in self.problems:
            if p.line is not None and p.line not in out:
                out[p.line] = classify_problem(p)
        return out

    @property
    def counts(self) -> dict[str, int]:
        """Bad lines per reason."""
        return dict(Counter(self.bad_lines.values()))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PREFLIGHT_VERSION,
            "split": self.split,
            "lines": self.lines,
            "problems": [
                {"message": p.message, "file": p.file, "line": p.line, "field": p.field}
                for p in self.problems
            ],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PreflightResult:
        return cls(
            split=d["split"],
            lines=int(d["lines"]),
            problems=[
                DataFormatError(p["message"], file=p["file"], line=p["line"], field=p["field"])
                for p in d["problems"]
            ],
            cached=True,
        )


def scan_key(
    root: Path, split: str, catalogue: TaskCatalogue, allow_external_paths: bool, max_image_pixels: int | None
) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [PREFLIGHT_VERSION, str(root.resolve()), split, allow_external_paths, max_image_pixels]
        ).encode()
    )
    h.update(json.dumps(catalogue.to_dict(), sort_keys=True).encode())
    with open(root / f"{split}.jsonl", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preflight_scan(
    root: str | Path,
    split: str,
    catalogue: TaskCatalogue,
    *,
    allow_external_paths: bool = False,
    max_image_pixels: int | None = None,
    cache_dir: str | Path | None = None,
) -> PreflightResult:
    """Validate ``root/{split}.jsonl`` like ``idrecog data check`` (JSON, names, classes, boxes, regression
    values, masks vs image size, images and frames open), cached by content hash. ``cache_dir=None``: the default
    cache folder; pass ``cache_dir=False``-like ``""`` to disable caching."""
    from idrecog.data.check import check_dataset

    root = Path(root)
    key = scan_key(root, split, catalogue, allow_external_paths, max_image_pixels)
    cache = Path(cache_dir) if cache_dir else (default_cache_dir() if cache_dir is None else None)
    entry = cache / f"{key}.json" if cache is not None else None
    if entry is not None and entry.is_file():
        try:
            d = json.loads(entry.read_text())
            if d.get("version") == PREFLIGHT_VERSION:
                return PreflightResult.from_json(d)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rescanned
    old_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # PIL only warns between 1x and 2x the limit: make that an error so the file is reported
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if max_image_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_image_pixels
        try:
            res = check_dataset(
                root, splits=[split], allow_external_paths=allow_external_paths, mask_samples=1
            )
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    # the checker reads tasks.yaml itself: it must be the catalogue the DataModule uses
    out = PreflightResult(split=split, lines=res.lines.get(split, 0), problems=list(res.problems))
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(out.to_json()))
            os.replace(tmp, entry)  # concurrent ranks write the same content; readers see a whole file
        except OSError:
            pass  # caching is an optimisation: a read-only home must not stop training
    return out


class SplitReader:
    """Reads the splits of a dataset folder under a ``data.on_error`` policy (docs/reliability.md).

    ``raise``: a pre-flight scan of each split (cached) stops on the first problem, naming file, line and field.
    ``skip``: lines the scan flagged (or, without a scan, malformed lines) are dropped and counted by reason in
    :attr:`skipped`. ``mask``: no scan; the manifest is read as it is.
    """

    def __init__(
        self,
        root: str | Path,
        catalogue: TaskCatalogue,
        *,
        on_error: str = "raise",
        preflight: bool = True,
        cache_dir: str | Path | None = None,
        allow_external_paths: bool = False,
        max_image_pixels: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.catalogue = catalogue
        self.on_error = on_error
        self.preflight = preflight
        self.cache_dir = cache_dir
        self.allow_external_paths = allow_external_paths
        self.max_image_pixels = max_image_pixels
        #: {split: {reason: samples}} dropped under ``on_error: skip``
        self.skipped: dict[str, dict[str, int]] = {}
        self._scans: dict[str, PreflightResult] = {}

    def scan(self, split: str) -> PreflightResult | None:
        """Scan ``split`` once (cached on disk); ``raise``: stop on the first problem; ``skip``: count them."""
        if not self.preflight or self.on_error not in ("raise", "skip"):
            return None
        if split in self._scans:
            return self._scans[split]
        from lightning.pytorch.utilities import rank_zero_info

        res = preflight_scan(
            self.root,
            split,
            self.catalogue,
            allow_external_paths=self.allow_external_paths,
            max_image_pixels=self.max_image_pixels,
            cache_dir=self.cache_dir,
        )
        self._scans[split] = res
        if not res.problems:
            return res
        if self.on_error == "raise":
            first = res.problems[0]
            more = f" ({len(res.problems)} problem(s) in {split}.jsonl; `idrecog data check {self.root}` lists them all"
            raise DataFormatError(
                f"{first.message}{more}; data.on_error: skip drops such samples)",
                file=first.file,
                line=first.line,
                field=first.field,
            )
        self.skipped[split] = res.counts
        rank_zero_info(
            f"[data] {split}: pre-flight scan{' (cached)' if res.cached else ''}: skipping "
            f"{len(res.bad_lines)} sample(s): "
            + ", ".join(f"{k}: {v}" for k, v in sorted(res.counts.items()))
        )
        return res

    def read(self, split: str) -> list[Sample]:
        """The split's samples; under ``skip``, without malformed lines and lines the pre-flight scan flagged."""
        scan = self.scan(split)
        path = self.root / f"{split}.jsonl"
        if self.on_error != "skip":
            return read_manifest(path, self.catalogue, allow_external_paths=self.allow_external_paths)
        if not path.is_file():
            raise DataFormatError("manifest not found", file=path)
        bad = scan.bad_lines if scan is not None else {}
        out = []
        for item in iter_manifest(path, self.catalogue, allow_external_paths=self.allow_external_paths):
            if isinstance(item, DataFormatError):
                if scan is None:  # no pre-flight: count manifest-level problems here
                    counts = self.skipped.setdefault(split, {})
                    reason = classify_problem(item)
                    counts[reason] = counts.get(reason, 0) + 1
                continue
            if item.line not in bad:
                out.append(item)
        return out
