"""The decision audit log and the retention of uploads (personal data) of ``idrecog serve``.

Audit log: one JSON line per recognition (decision or failure), appended to a file that rotates by size
(:class:`logging.handlers.RotatingFileHandler`: ``decisions.jsonl`` -> ``decisions.jsonl.1`` ...). A line holds
what is needed to answer "which model and which rules made this decision, for whom": request id, time, key id
(never the key), the checkpoint / catalogue / rules hashes, decision and reasons. It holds no image bytes, and
user attributes or the client's own ``id`` only where :class:`AuditSettings` says so.

Uploads: by default nothing a client sends is written to disk (the server parses uploads in memory). Where a
deployment must keep them, :class:`RetentionSettings` names a folder, what to keep and for how many days.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from idrecog.errors import ConfigError


@dataclass
class AuditSettings:
    """Where and how the decision audit log is written."""

    #: JSON-lines file; None: no audit log (allowed only with ``--insecure``)
    path: str | None = None
    #: rotate when the file would pass this size; keep ``backup_count`` rotated files (oldest deleted)
    max_bytes: int = 100 * 1024 * 1024
    backup_count: int = 20
    #: also write the request's ``user`` object (personal data) into each line
    include_user: bool = False
    #: also write the client's ``id`` form field (it may name a person)
    include_client_id: bool = False


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Opens each new file with mode 0600 (audit lines say who was checked, and when), and lets a failed write
    raise instead of printing it: a decision that cannot be audited is not answered."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8")

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # called from the except block of emit(): re-raise its exception


class AuditLog:
    """Appends one JSON object per line; thread-safe (logging handlers hold a lock); every line is flushed."""

    _count = 0

    def __init__(self, settings: AuditSettings, provenance: dict[str, str]) -> None:
        if not settings.path:
            raise ConfigError("audit.path: a file for the decision audit log is required")
        if settings.max_bytes < 1024 or settings.backup_count < 1:
            raise ConfigError("audit.max_bytes must be >= 1024 and audit.backup_count >= 1")
        path = Path(settings.path)
        if path.is_dir():
            raise ConfigError(f"audit.path: {path} is a folder, give a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.provenance = dict(provenance)
        self.path = path
        self.handler = _PrivateRotatingFileHandler(
            path, mode="a", maxBytes=settings.max_bytes, backupCount=settings.backup_count, encoding="utf-8"
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        # a private logger per log file that never propagates: audit lines reach no console or root handler
        AuditLog._count += 1
        self.logger = logging.getLogger(f"idrecog.audit.{AuditLog._count}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)

    def write(
        self,
        *,
        request_id: str,
        key_id: str | None,
        outcome: str,
        record: dict[str, Any] | None = None,
        error: str | None = None,
        client_id: str | None = None,
        user: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One line: ``outcome`` is ``decision`` (``record`` is the recognize object) or ``error``. Raises
        (OSError, ...) when the line could not be written."""
        line: dict[str, Any] = {
            "request_id": request_id,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "key_id": key_id,
            **self.provenance,
            "outcome": outcome,
        }
        if record is not None:
            rec = record.get("recognition") or {}
            line["decision"] = rec.get("decision")
            line["reasons"] = rec.get("reasons", [])
            line["doc_type"] = record.get("doc_type")
            line["tasks"] = (record.get("tasks") or {}).get("resolved")
        if error is not None:
            line["error"] = error
        if self.settings.include_client_id and client_id is not None:
            line["client_id"] = client_id
        if self.settings.include_user and user is not None:
            line["user"] = user
        self.logger.info(json.dumps(line, default=str, ensure_ascii=False))
        return line

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


@dataclass
class RetentionSettings:
    """Keeping uploads (personal data). Default: nothing is kept."""

    #: folder for kept uploads (``DIR/YYYY-MM-DD/REQUEST_ID/``); None: nothing is written
    dir: str | None = None
    #: keep the uploaded image files as sent (image, flash, angles)
    images: bool = False
    #: keep the ``user`` JSON object
    user: bool = False
    #: delete kept uploads older than this many days (checked at start and every hour)
    days: float = 30.0


class Retention:
    """Writes the uploads that :class:`RetentionSettings` asks to keep, and deletes them after ``days``."""

    def __init__(self, settings: RetentionSettings) -> None:
        if settings.dir is None:
            raise ConfigError("retention.dir: give a folder, or leave retention off")
        if not (settings.images or settings.user):
            raise ConfigError("retention.dir is set but neither retention.images nor retention.user is true")
        if not settings.days > 0:
            raise ConfigError(f"retention.days must be > 0, got {settings.days}")
        self.settings = settings
        self.root = Path(settings.dir)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()

    @staticmethod
    def check(settings: RetentionSettings) -> Retention | None:
        """A :class:`Retention` when the settings keep anything, else None (a flag without a folder fails)."""
        if settings.dir is None:
            if settings.images or settings.user:
                raise ConfigError("retention.images / retention.user need retention.dir (where to keep them)")
            return None
        return Retention(settings)

    def keep(
        self, request_id: str, files: list[tuple[str, bytes]], user: dict[str, Any] | None
    ) -> Path | None:
        """Write this request's uploads (blocking: call from a worker thread); returns its folder."""
        if not ((self.settings.images and files) or (self.settings.user and user is not None)):
            return None
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        folder = self.root / day / request_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.settings.images:
            for name, data in files:
                _write_private(folder / name, data)
        if self.settings.user and user is not None:
            _write_private(folder / "user.json", json.dumps(user).encode())
        return folder

    def purge(self, now: float | None = None) -> int:
        """Delete request folders older than ``days``; returns how many were deleted."""
        cutoff = (now if now is not None else time.time()) - self.settings.days * 86400
        removed = 0
        with self._lock:
            for day in sorted(self.root.iterdir()) if self.root.is_dir() else []:
                if not day.is_dir():
                    continue
                for req in list(day.iterdir()):
                    if req.stat().st_mtime < cutoff:
                        shutil.rmtree(req, ignore_errors=True)
                        removed += 1
                if not any(day.iterdir()):
                    day.rmdir()
        return removed


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
