"""API keys of ``idrecog serve``: random keys stored as SHA-256 hashes, checked in constant time.

A key is ``idr_`` + 32 random bytes (URL-safe base64); the server only ever holds ``sha256(key)``. SHA-256 and
not scrypt: the keys are random with 256 bits of entropy, so a slow hash adds nothing against guessing and would
cost every request milliseconds. Key lines (a file, or the ``IDRECOG_API_KEYS`` environment variable with lines
separated by newlines or commas)::

    # KEY_ID  sha256:HEX  [revoked]
    ops       sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b
    old-ci    sha256:d4735e3a265e16eee03f59718b9b5d03019c07d8b6c51f90da3a666eec13ab35  revoked

The file is re-read when it changes (looked at no more than once a second), so revoking a key needs no restart.
``idrecog serve-key --id NAME --keys_file FILE`` makes a key, prints it once and appends its hash line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from idrecog.errors import ConfigError

ENV_VAR = "IDRECOG_API_KEYS"
KEY_PREFIX = "idr_"
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class ApiKey:
    """One stored key: its public id, the SHA-256 hex digest of the secret, and whether it is revoked."""

    id: str
    sha256: str
    revoked: bool = False


class AuthError(Exception):
    """A request without a valid key: 401 (missing or unknown key) or 403 (revoked key)."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh random API key (show it once; store only :func:`hash_key` of it)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_line(key_id: str, key: str) -> str:
    return f"{key_id} sha256:{hash_key(key)}"


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Key lines -> keys; a bad line raises a ConfigError naming ``source`` and the line number."""
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source}:{n}" if source != ENV_VAR else f"{ENV_VAR} entry {n}"
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "revoked"):
            raise ConfigError(f"{where}: expected 'KEY_ID sha256:HEX [revoked]', got {len(parts)} word(s)")
        kid, digest = parts[0], parts[1]
        if not digest.startswith("sha256:") or len(digest) != 71 or not set(digest[7:]) <= _HEX:
            raise ConfigError(f"{where}: key {kid!r}: the hash must be 'sha256:' + 64 lowercase hex digits")
        if kid in seen:
            raise ConfigError(f"{where}: key id {kid!r} appears twice")
        seen.add(kid)
        keys.append(ApiKey(kid, digest[7:], revoked=len(parts) == 3))
    return keys


class ApiKeyStore:
    """The keys the server accepts, from a file (re-read on change) and/or a fixed list (the environment).

    :meth:`check` hashes the presented key and compares it with every stored hash with
    :func:`hmac.compare_digest`, without stopping at a match, so the time taken does not say which key or
    how many leading characters matched.
    """

    def __init__(
        self, keys: list[ApiKey] | None = None, path: str | Path | None = None, recheck_seconds: float = 1.0
    ) -> None:
        self._fixed = list(keys or [])
        self.recheck_seconds = recheck_seconds
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._file_keys: list[ApiKey] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        if self.path is not None:
            self._reload(initial=True)
        if not self.keys:
            where = str(self.path) if self.path is not None else ENV_VAR
            raise ConfigError(f"{where}: no API keys (add one with `idrecog serve-key --id NAME`)")

    @classmethod
    def from_sources(cls, path: str | Path | None, env: dict[str, str] | None = None) -> ApiKeyStore | None:
        """Keys from ``path`` and the ``IDRECOG_API_KEYS`` variable; None when neither gives any."""
        env_text = (env if env is not None else os.environ).get(ENV_VAR, "")
        fixed = parse_keys(env_text, ENV_VAR) if env_text.strip() else []
        if path is None and not fixed:
            return None
        return cls(fixed, path)

    @property
    def keys(self) -> list[ApiKey]:
        return self._fixed + self._file_keys

    def _reload(self, initial: bool = False) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if initial:
                raise ConfigError(f"API key file not found: {self.path}") from None
            return  # keep the keys we have; a file being replaced can vanish for a moment
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            keys = parse_keys(self.path.read_text(), str(self.path))
        except ConfigError:
            if initial:
                raise
            return  # a half-written file: keep the last good keys, look again on the next check
        ids = {k.id for k in self._fixed}
        clash = [k.id for k in keys if k.id in ids]
        if clash:
            raise ConfigError(f"{self.path}: key id {clash[0]!r} is also in {ENV_VAR}")
        self._file_keys, self._stamp = keys, stamp

    def check(self, presented: str | None) -> ApiKey:
        """The key a request presented -> its :class:`ApiKey`, or :class:`AuthError` (401/403)."""
        if self.path is not None and time.monotonic() - self._checked >= self.recheck_seconds:
            with self._lock:
                self._checked = time.monotonic()
                try:
                    self._reload()
                except ConfigError:
                    pass
        if not presented:
            raise AuthError(
                401, "an API key is required (header 'Authorization: Bearer KEY' or 'X-API-Key')", "no_key"
            )
        digest = hash_key(presented)
        found: ApiKey | None = None
        for k in self.keys:
            if hmac.compare_digest(digest, k.sha256):
                found = k
        if found is None:
            raise AuthError(401, "unknown API key", "bad_key")
        if found.revoked:
            raise AuthError(403, f"API key {found.id!r} is revoked", "revoked_key")
        return found


def add_key(path: str | Path, key_id: str) -> str:
    """Append a new key's hash line to ``path`` (created with mode 0600) and return the key itself."""
    path = Path(path)
    existing = parse_keys(path.read_text(), str(path)) if path.is_file() else []
    if not key_id or any(c.isspace() or c in "#," for c in key_id):
        raise ConfigError(f"--id {key_id!r}: a key id is one word without '#' or ','")
    if any(k.id == key_id for k in existing):
        raise ConfigError(f"{path}: key id {key_id!r} already exists")
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(key_line(key_id, key) + "\n")
    return key


def revoke_key(path: str | Path, key_id: str) -> None:
    """Mark ``key_id`` revoked in ``path`` (the file is rewritten atomically)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"API key file not found: {path}")
    keys = parse_keys(path.read_text(), str(path))
    if not any(k.id == key_id for k in keys):
        raise ConfigError(f"{path}: no key with id {key_id!r}")
    text = "".join(
        f"{k.id} sha256:{k.sha256}{' revoked' if k.revoked or k.id == key_id else ''}\n" for k in keys
    )
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
