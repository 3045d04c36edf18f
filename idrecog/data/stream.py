"""The packed (streaming) format: LitData shards of a dataset folder, read from a folder or object storage.

``idrecog data pack ROOT --out DIR`` (:func:`pack_dataset`) writes::

    DIR/tasks.yaml        the catalogue, as in ROOT
    DIR/{split}.jsonl     the manifests, as in ROOT (the index: small, read whole at setup)
    DIR/{split}/          LitData shards (``litdata.optimize``): one record per manifest line
    DIR/pack.json         what was packed (format version, splits, samples, bytes)

A record holds the manifest line (its ``index`` in the manifest, ``id``, the line as JSON) and the bytes of
every file the line references: the image, its associated frames and label files (segmentation masks,
``TaskType.label_files``), stored as they are on disk (no re-encoding: decoded pixels are the same).

``data.format: litdata`` (:class:`PackedSplit`, a ``litdata.StreamingDataset``) streams a split from ``DIR`` or
from ``s3://bucket/prefix``: LitData downloads the shards into a local cache and shards them over DDP ranks and
DataLoader workers. Each record becomes an item through :meth:`IdDataset.item`, the code the folder format
runs (task resolution over the manifest, user-feature encoding, frames, transforms), then the same collation.

Object storage is reached with boto3's own configuration: ``AWS_ENDPOINT_URL`` (an S3-compatible server),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, or a profile
(``AWS_PROFILE``); docs/data-format.md, "Packed datasets".
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from litdata import StreamingDataset

from idrecog.data.dataset import FolderFiles, IdDataset
from idrecog.data.manifest import SPLITS, Sample, parse_sample, read_manifest
from idrecog.errors import ConfigError, DataFormatError
from idrecog.tasks.catalogue import TaskCatalogue, load_catalogue
from idrecog.tasks.registry import create_task_type

__all__ = [
    "PACK_FORMAT_VERSION",
    "PackedFiles",
    "PackedSplit",
    "is_remote",
    "pack_dataset",
    "read_packed_catalogue",
    "read_packed_manifest",
]

PACK_FORMAT_VERSION = 1
PACK_FILE = "pack.json"
_MAGIC = b"IDRF1"


# ---------------------------------------------------------------------------------------------- locations
def is_remote(location: str) -> bool:
    """True for an object-storage URL (``s3://...``), False for a local folder."""
    return "://" in location


def _join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts]) if is_remote(location) else str(Path(location, *parts))


def read_bytes(location: str) -> bytes:
    """A small file (catalogue, manifest, pack.json) from a local path or ``s3://bucket/key`` (boto3, which
    reads the endpoint and credentials from the environment)."""
    if not is_remote(location):
        return Path(location).read_bytes()
    url = urlparse(location)
    if url.scheme != "s3":
        raise ConfigError(f"data.root: {location!r}: only local folders and s3:// URLs are supported")
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        body = boto3.client("s3").get_object(Bucket=url.netloc, Key=url.path.lstrip("/"))["Body"]
        return body.read()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            raise FileNotFoundError(location) from None
        raise
    except BotoCoreError as e:
        raise ConfigError(f"data.root: cannot read {location}: {e}") from None


def read_packed_catalogue(location: str) -> TaskCatalogue:
    """``location/tasks.yaml`` of a packed dataset."""
    path = _join(location, "tasks.yaml")
    if not is_remote(location):
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        return load_catalogue(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "tasks.yaml"
        local.write_bytes(read_bytes(path))
        return load_catalogue(local)


def read_packed_manifest(location: str, split: str, catalogue: TaskCatalogue) -> list[Sample]:
    """The manifest of a packed split (its index), validated as a folder's manifest is."""
    path = _join(location, f"{split}.jsonl")
    try:
        text = read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise DataFormatError("manifest not found", file=path) from None
    out = []
    for i, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            # paths were checked when packing; they name records' files, not files on this machine
            out.append(
                parse_sample(json.loads(raw), catalogue, source=path, line=i, allow_external_paths=True)
            )
    return out


# ---------------------------------------------------------------------------------------------- records
def _encode_files(files: dict[str, bytes]) -> bytes:
    """``{relative path: bytes}`` as one blob: magic, header length, a JSON header [[path, size]...], payloads
    (no pickle: a shard from object storage must not be able to run code)."""
    header = json.dumps([[k, len(v)] for k, v in files.items()]).encode("utf-8")
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header, *files.values()])


def _decode_files(blob: bytes | memoryview) -> dict[str, bytes]:
    mv = memoryview(blob)  # LitData hands out views into the chunk
    if bytes(mv[: len(_MAGIC)]) != _MAGIC:
        raise DataFormatError("not an idrecog packed record (bad magic); repack with `idrecog data pack`")
    n = struct.unpack_from("<I", mv, len(_MAGIC))[0]
    start = len(_MAGIC) + 4
    header = json.loads(bytes(mv[start : start + n]).decode("utf-8"))
    out, pos = {}, start + n
    for rel, size in header:
        out[rel] = bytes(mv[pos : pos + size])
        pos += size
    return out


class _NamedBytes(io.BytesIO):
    """The bytes of a packed file, named for messages."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name


class PackedFiles(FolderFiles):
    """A sample's files from its packed record; label files are written to a scratch folder for the task
    types' ``load_target`` (which reads paths), only when the sample has any."""

    def __init__(self, files: dict[str, bytes], label_files: Sequence[str], where: str) -> None:
        super().__init__(Path(where))
        self._files = files
        self._label_files = list(label_files)
        self._where = where

    def open(self, rel: str) -> Path | BinaryIO:
        data = self._files.get(rel)
        if data is None:
            raise FileNotFoundError(rel)
        return _NamedBytes(data, rel)

    def exists(self, rel: str) -> bool:
        return rel in self._files

    def describe(self, rel: str) -> str:
        return f"{self._where}:{rel}"

    @contextmanager
    def label_root(self) -> Iterator[Path]:
        if not self._label_files:
            yield Path(self._where)
            return
        tmp = tempfile.mkdtemp(prefix="idrecog-labels-")
        try:
            for rel in self._label_files:
                if rel in self._files:
                    dst = Path(tmp, rel)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(self._files[rel])
            yield Path(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- packing
def _label_files(sample: Sample, catalogue: TaskCatalogue) -> list[str]:
    out: list[str] = []
    for spec in catalogue:
        value = sample.labels.get(spec.name)
        if value is not None:
            out += create_task_type(spec).label_files(value)
    return out


def _pack_record(item: tuple[str, int, str, list[str], list[str]]) -> dict[str, Any]:
    """``litdata.optimize``'s function: one manifest line -> one record (runs in LitData's workers)."""
    root, index, line, paths, label_files = item
    files: dict[str, bytes] = {}
    for rel in paths:
        try:
            files[rel] = (Path(root) / rel).read_bytes()
        except FileNotFoundError:
            if rel in label_files or rel == paths[0]:
                raise  # the image and label files must exist; a missing frame is masked as in the folder
    return {"index": index, "line": line, "files": _encode_files(files), "labels": json.dumps(label_files)}


def pack_dataset(
    root: str | Path,
    out: str,
    *,
    splits: Sequence[str] = SPLITS,
    chunk_bytes: str = "64MB",
    num_workers: int = 1,
    allow_external_paths: bool = False,
) -> dict[str, Any]:
    """Write the LitData shards of a dataset folder to ``out`` (a folder or an ``s3://`` URL); returns the
    summary also written to ``out/pack.json``. Every manifest line is validated first (the first malformed one
    raises ``DataFormatError``). With ``num_workers=1`` the records keep the manifest's order, so an unshuffled
    stream yields the folder format's batches; more workers pack faster and interleave their shards."""
    import litdata

    root = Path(root)
    if num_workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {num_workers}")
    catalogue = load_catalogue(root / "tasks.yaml")
    found = [s for s in splits if (root / f"{s}.jsonl").is_file()]
    if not found:
        raise ConfigError(f"{root}: no manifest of {list(splits)} to pack")
    summary: dict[str, Any] = {"format_version": PACK_FORMAT_VERSION, "source": str(root), "splits": {}}
    staging = None if not is_remote(out) else Path(tempfile.mkdtemp(prefix="idrecog-pack-"))
    try:
        meta = staging if staging is not None else Path(out)
        meta.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "tasks.yaml", meta / "tasks.yaml")
        for split in found:
            manifest = root / f"{split}.jsonl"
            samples = read_manifest(manifest, catalogue, allow_external_paths=allow_external_paths)
            inputs = []
            for i, s in enumerate(samples):
                labels = _label_files(s, catalogue)
                paths = list(dict.fromkeys([s.image, *([s.flash] if s.flash else []), *s.angles, *labels]))
                inputs.append((str(root), i, json.dumps(s.to_json()), paths, labels))
            litdata.optimize(
                fn=_pack_record,
                inputs=inputs,
                output_dir=_join(out, split),
                chunk_bytes=chunk_bytes,
                num_workers=num_workers,
                mode="overwrite",
                reorder_files=False,
                verbose=False,
                # fork: the workers inherit the imported modules (spawn re-imports torch in each, minutes on 2 cores)
                start_method="fork",
            )
            shutil.copyfile(manifest, meta / f"{split}.jsonl")
            summary["splits"][split] = {"samples": len(samples)}
        (meta / PACK_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        if staging is not None:
            _upload(staging, out)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return summary


def _upload(folder: Path, location: str) -> None:
    import boto3

    url = urlparse(location)
    client = boto3.client("s3")
    for f in sorted(folder.iterdir()):
        client.upload_file(str(f), url.netloc, "/".join([url.path.strip("/"), f.name]).lstrip("/"))


# ---------------------------------------------------------------------------------------------- streaming
class PackedSplit(StreamingDataset):
    """One packed split as a ``litdata.StreamingDataset`` whose items are ``IdDataset`` items.

    Args:
        location: the split's shards (``DIR/{split}`` or ``s3://.../{split}``).
        dataset: the ``IdDataset`` of the same split built from the packed manifest (its samples, resolver,
            transform, user encoder): records whose sample it dropped (no applying task, limit) are skipped.
        shuffle, seed, drop_last: LitData's chunk-then-item shuffle (the order depends on seed and epoch).
        cache_dir: LitData's local chunk cache (None: its default); ``max_cache_size``: its bound.
    """

    def __init__(
        self,
        location: str,
        dataset: IdDataset,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
    ) -> None:
        super().__init__(
            location,
            cache_dir=cache_dir,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            max_cache_size=max_cache_size,
        )
        self.dataset = dataset
        self.location = location
        self.position = {s.id: j for j, s in enumerate(dataset.samples)}

    def to_item(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """A record -> the ``IdDataset`` item of its sample (None: the split does not use that sample)."""
        line = json.loads(record["line"])
        j = self.position.get(str(line["id"]))
        if j is None:
            return None
        files = PackedFiles(_decode_files(record["files"]), json.loads(record["labels"]), self.location)
        return self.dataset.item(j, files)

    def __next__(self) -> dict[str, Any]:
        while True:
            item = self.to_item(super().__next__())
            if item is not None:
                return item
