"""The package's layering: every import inside ``idrecog`` (module level or inside functions) goes to the same
top-level package or to a lower layer, so there is no cycle between top-level packages."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import idrecog

ROOT = Path(idrecog.__file__).parent

# lowest first; a package may import its own modules and those of any lower layer, nothing else
LAYERS: list[set[str]] = [
    {"errors"},
    {"__init__", "registry", "utils", "loggers", "text"},
    {"tasks"},
    {"models", "synth"},
    {"data"},
    {"lit"},
    {"recognition"},
    {"callbacks"},
    {"cli"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "idrecog":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, int, str, str]]:
    """(file, line, importing top-level package, imported top-level package) for every idrecog import."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        src = rel.parts[0].removesuffix(".py")
        pkg = ".".join(("idrecog", *rel.with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = pkg.rsplit(".", node.level)[0] if rel.name != "__init__.py" else pkg
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                targets = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                dst = _top(t)
                if dst is not None:
                    out.append((str(rel), node.lineno, src, dst))
    return out


def test_every_top_level_package_has_a_layer() -> None:
    tops = {
        p.name.removesuffix(".py")
        for p in ROOT.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert tops - set(LAYER_OF) == set(), "add new top-level packages to LAYERS"


def test_imports_only_go_down() -> None:
    bad = [
        f"{f}:{line}: {src} (layer {LAYER_OF[src]}) imports {dst} (layer {LAYER_OF[dst]})"
        for f, line, src, dst in imports()
        if src != dst and LAYER_OF[dst] >= LAYER_OF[src]
    ]
    assert bad == []


def test_no_cycle_between_top_level_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for _, _, src, dst in imports():
        if src != dst and "__init__" not in (src, dst):
            graph[src].add(dst)

    def reach(a: str, seen: set[str]) -> set[str]:
        for b in graph[a] - seen:
            seen.add(b)
            reach(b, seen)
        return seen

    cycles = sorted(a for a in list(graph) if a in reach(a, set()))
    assert cycles == []


@pytest.mark.parametrize("src, dst", [("data", "lit"), ("tasks", "data"), ("models", "data")])
def test_the_checker_sees_a_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src: str, dst: str
) -> None:
    """The walker finds imports inside functions too (a lazy import is still a dependency)."""
    fake = tmp_path / "idrecog"
    (fake / src).mkdir(parents=True)
    (fake / src / "mod.py").write_text(f"def f():\n    from idrecog.{dst}.x import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    found = [(s, d) for _, _, s, d in imports()]
    assert (src, dst) in found and LAYER_OF[dst] > LAYER_OF[src]
