"""One typed registry (timm style) behind every plugin table: task types, task resolvers, query providers and
loss balancers.

A table maps names to classes. Classes join it with a decorator (``@TABLE.register`` reads the name from a
class attribute, ``@TABLE.register("name")`` names it), or from another installed distribution through an
entry point in the table's group (``[project.entry-points."idrecog.task_types"] ordinal = "pkg.mod:Ordinal"``),
loaded the first time a name is missing. Nothing else is imported: a config or checkpoint that names a module
path is refused, so that no file can make idrecog import arbitrary code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar, overload

from idrecog.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
C = TypeVar("C", bound=type)


class Registry(Generic[T]):
    """Names -> subclasses of ``base``.

    Args:
        kind: what the entries are, for messages ("task type", "query provider"...).
        base: the class every entry must subclass.
        name_attr: the class attribute that names an entry registered with a bare ``@register``.
        group: the entry-point group searched for names not registered in this process.
        builtins: a module imported before the first look-up (it registers the built-in entries).
    """

    def __init__(
        self,
        kind: str,
        base: type[T] | None = None,
        *,
        name_attr: str = "name",
        group: str | None = None,
        builtins: str | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self.name_attr = name_attr
        self.group = group
        self.builtins = builtins
        self._entries: dict[str, type[T]] = {}
        self._entry_points_loaded = False

    # ------------------------------------------------------------------ registration
    @overload
    def register(self, name: C) -> C: ...

    @overload
    def register(self, name: str | None = None) -> Callable[[C], C]: ...

    def register(self, name: Any = None) -> Any:
        """Class decorator, bare (name from ``name_attr``) or called with the name."""
        if isinstance(name, type):
            return self._add(name, None)

        def deco(cls: C) -> C:
            return self._add(cls, name)

        return deco

    def _add(self, cls: C, name: str | None) -> C:
        if name is None:
            name = getattr(cls, self.name_attr, None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{cls.__qualname__} must set a non-empty class attribute {self.name_attr!r}")
        if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ConfigError(f"{cls.__qualname__} is not a {self.base.__name__}; cannot be a {self.kind}")
        existing = self._entries.get(name)
        # re-registering the same class (a module imported twice, e.g. as a script and as a module) is fine
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ConfigError(
                f"{self.kind} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        self._entries[name] = cls  # type: ignore[assignment]
        return cls

    # ------------------------------------------------------------------ look-up
    def _ensure_builtins(self) -> None:
        if self.builtins is not None:
            import importlib

            importlib.import_module(self.builtins)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self.group is None:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            if ep.name in self._entries:
                continue
            try:
                cls = ep.load()
            except Exception as e:  # a broken plug-in names itself, it does not break idrecog
                raise ConfigError(
                    f"{self.kind} {ep.name!r}: entry point {ep.value!r} ({self.group}) failed to load: {e}"
                ) from e
            self._add(cls, ep.name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        self._ensure_builtins()
        if name not in self._entries:
            self._load_entry_points()
        return name in self._entries

    def names(self) -> list[str]:
        """Every registered name (entry points included), sorted."""
        self._ensure_builtins()
        self._load_entry_points()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str, field: str | None = None) -> type[T]:
        """The class registered under ``name``; the error lists the valid names (prefixed by ``field``)."""
        if name not in self:
            where = f"{field}: " if field else ""
            hint = ""
            if isinstance(name, str) and (":" in name or "." in name):
                hint = (
                    f" (a {self.kind} is named by its registered name; a plug-in registers itself on import or"
                    f" through an entry point in group {self.group!r}: idrecog never imports a module named by"
                    " a config or checkpoint)"
                )
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}; registered: {', '.join(self.names())}{hint}"
            )
        return self._entries[name]

    def create(self, name: str, *args: Any, field: str | None = None, **kwargs: Any) -> T:
        """Instantiate the class registered under ``name``."""
        return self.get(name, field)(*args, **kwargs)

    def name_of(self, cls: type) -> str | None:
        """The name ``cls`` is registered under (None if it is not)."""
        self._ensure_builtins()
        return next((n for n, c in self._entries.items() if c is cls), None)

    def class_path(self, name: str) -> str:
        """``module.Class`` of a registered name (what a LightningCLI ``class_path`` holds)."""
        cls = self.get(name)
        return f"{cls.__module__}.{cls.__qualname__}"

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
