"""Error types. Every user-facing failure is an ``IdrecogError``; the CLI prints it on one line, exit code 2."""

from __future__ import annotations

from pathlib import Path


class IdrecogError(Exception):
    """Base class of every error idrecog reports to a user (one line, no traceback)."""


class ConfigError(IdrecogError, ValueError):
    """A configuration value is wrong (unknown name, bad type, incompatible checkpoint)."""


class DataFormatError(IdrecogError, ValueError):
    """A dataset file is malformed. The message names the file, the line (1-based, if any) and the field.

    >>> str(DataFormatError("bad value", file="d/train.jsonl", line=3, field="labels.tampering"))
    "d/train.jsonl:3: field 'labels.tampering': bad value"
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.line}" if self.line is not None else "") + ": "
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}{what}{self.message}"


class NonFiniteLossError(IdrecogError):
    """Training stopped: the loss was NaN or inf for too many consecutive steps."""
