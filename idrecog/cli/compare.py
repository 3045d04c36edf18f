"""``idrecog compare RUN_DIR... --out report``: compare runs without a W&B server.

Each RUN_DIR may be (or contain) Lightning CSV logs (``.../version_N/metrics.csv`` with ``hparams.yaml`` and,
beside it or above it, the CLI's ``config.yaml``) or offline W&B run folders (``wandb/offline-run-*/files/``
with ``wandb-summary.json`` and ``config.yaml``). For every run the query design (from the config's
``model.init_args.queries.class_path``) and the last value of each task's primary metric (``test/`` when
logged, else ``val/``) are read. Writes ``report.md`` (a table per run and the mean per design) and
``report.png`` (a bar chart of the per-design means, with the runs' spread).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idrecog.errors import ConfigError, DataFormatError
from idrecog.tasks.catalogue import TaskCatalogue, coerce_catalogue, default_catalogue

__all__ = ["Run", "find_runs", "main", "write_report"]


@dataclass
class Run:
    """One run: where it was read from, its design and seed, and its last metric values."""

    name: str
    path: Path
    design: str
    seed: Any
    metrics: dict[str, float] = field(default_factory=dict)
    catalogue: TaskCatalogue | None = None


def _design_of(config: dict[str, Any]) -> str:
    from idrecog.cli.train import query_design

    model = config.get("model") or {}
    if isinstance(model, dict) and "value" in model and isinstance(model["value"], dict):
        model = model["value"]  # W&B config.yaml wraps values: {key: {value: ...}}
    args = model.get("init_args", model) if isinstance(model, dict) else {}
    q = (args or {}).get("queries")
    return query_design(q.get("class_path") if isinstance(q, dict) else q)


def _unwrap_wandb(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataFormatError(f"not valid YAML: {e}", file=path) from None
    return data if isinstance(data, dict) else {}


def _catalogue_from(config: dict[str, Any], hparams: dict[str, Any]) -> TaskCatalogue | None:
    for src in (
        hparams.get("catalogue"),
        ((config.get("model") or {}).get("init_args") or {}).get("catalogue"),
    ):
        if isinstance(src, dict):
            try:
                return coerce_catalogue(src)
            except DataFormatError:
                pass
    return None


def _read_csv(path: Path) -> dict[str, float]:
    """The last finite value of every column of a Lightning ``metrics.csv``."""
    out: dict[str, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k is None or v in (None, ""):
                    continue
                try:
                    x = float(v)
                except ValueError:
                    continue
                if math.isfinite(x):
                    out[k] = x
    return out


def _find_config(start: Path, stop: Path) -> Path | None:
    """``config.yaml`` in ``start`` or a parent up to ``stop`` (the CLI writes it to the logger's log_dir)."""
    d = start
    while True:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
        if d == stop or d.parent == d:
            return None
        d = d.parent


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every CSV and offline W&B run under the given folders (each folder may itself be a run)."""
    runs: list[Run] = []
    for root in map(Path, paths):
        if not root.exists():
            raise ConfigError(f"compare: run folder {str(root)!r} does not exist")
        found = 0
        for csv_path in sorted(root.rglob("metrics.csv")):
            d = csv_path.parent
            hp = _read_yaml(d / "hparams.yaml") if (d / "hparams.yaml").is_file() else {}
            cfg_path = _find_config(d, root)
            cfg = _read_yaml(cfg_path) if cfg_path else {}
            design = _design_of(cfg) if cfg else _design_of({"model": {"init_args": hp}})
            name = str(d.relative_to(root.parent)) if d != root else root.name
            runs.append(
                Run(
                    name, d, design, cfg.get("seed_everything"), _read_csv(csv_path), _catalogue_from(cfg, hp)
                )
            )
            found += 1
        for summary in sorted(root.rglob("wandb-summary.json")):
            d = summary.parent
            try:
                values = json.loads(summary.read_text())
            except json.JSONDecodeError as e:
                raise DataFormatError(f"not valid JSON: {e}", file=summary) from None
            cfg = _unwrap_wandb(_read_yaml(d / "config.yaml")) if (d / "config.yaml").is_file() else {}
            metrics = {
                k: float(v)
                for k, v in values.items()
                if isinstance(v, int | float) and math.isfinite(float(v))
            }
            run_dir = d.parent if d.name == "files" else d
            runs.append(
                Run(
                    run_dir.name,
                    d,
                    _design_of(cfg),
                    cfg.get("seed_everything"),
                    metrics,
                    _catalogue_from(cfg, {}),
                )
            )
            found += 1
        if not found:
            raise ConfigError(
                f"compare: no runs under {str(root)!r} (expected lightning_logs/version_N/metrics.csv or "
                "wandb/offline-run-*/files/wandb-summary.json)"
            )
    return runs


def _primary(run: Run, catalogue: TaskCatalogue) -> dict[str, float]:
    """task -> the primary metric's value (test when logged, else val)."""
    from idrecog.tasks.registry import get_task_type_class

    out = {}
    for spec in catalogue:
        pm = get_task_type_class(spec.type).primary_metric
        for stage in ("test", "val"):
            v = run.metrics.get(f"{stage}/{spec.name}/{pm}")
            if v is not None:
                out[spec.name] = v
                break
    return out


def write_report(runs: list[Run], out: str | Path) -> tuple[Path, Path]:
    """Write ``<out>.md`` and ``<out>.png`` (``out`` without suffix, or a folder ending in ``/``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from idrecog.tasks.registry import get_task_type_class

    out = Path(out)
    base = out / "report" if str(out).endswith(("/", "\\")) or out.is_dir() else out.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    catalogue = next((r.catalogue for r in runs if r.catalogue is not None), None) or default_catalogue()
    values = [_primary(r, catalogue) for r in runs]
    tasks = [t for t in catalogue.names if any(t in v for v in values)]
    if not tasks:
        raise ConfigError(
            "compare: none of the runs logged a task's primary metric ({stage}/{task}/{metric})"
        )
    pms = {t: get_task_type_class(catalogue[t].type).primary_metric for t in tasks}
    designs = list(dict.fromkeys(r.design for r in runs))
    means: dict[str, dict[str, float]] = {}
    stds: dict[str, dict[str, float]] = {}
    for d in designs:
        rows = [v for r, v in zip(runs, values, strict=True) if r.design == d]
        means[d], stds[d] = {}, {}
        for t in tasks:
            xs = [v[t] for v in rows if t in v]
            if xs:
                means[d][t] = float(np.mean(xs))
                stds[d][t] = float(np.std(xs))

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    head = ["run", "design", "seed", *[f"{t} ({pms[t]})" for t in tasks]]
    lines = [
        "# Run comparison",
        "",
        "Each task's primary metric (test when logged, else validation; last logged value).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r, v in zip(runs, values, strict=True):
        lines.append(
            "| " + " | ".join([r.name, r.design, str(r.seed), *[fmt(v.get(t)) for t in tasks]]) + " |"
        )
    lines += ["", "## Mean per design (± std over runs)", "", "| design | runs | " + " | ".join(tasks) + " |"]
    lines.append("|" + "---|" * (len(tasks) + 2))
    for d in designs:
        n = sum(r.design == d for r in runs)
        cells = [f"{means[d][t]:.4f} ± {stds[d][t]:.4f}" if t in means[d] else "-" for t in tasks]
        lines.append(f"| {d} | {n} | " + " | ".join(cells) + " |")
    md = base.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4.0))
    x = np.arange(len(tasks))
    width = 0.8 / max(1, len(designs))
    for k, d in enumerate(designs):
        ys = [means[d].get(t, np.nan) for t in tasks]
        es = [stds[d].get(t, 0.0) for t in tasks]
        ax.bar(x + (k - (len(designs) - 1) / 2) * width, ys, width, yerr=es, capsize=2, label=d)
    ax.set_xticks(x, [f"{t}\n{pms[t]}" for t in tasks], fontsize=7)
    ax.set_ylabel("primary metric")
    ax.set_title("task primary metric per query design (mean over runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = base.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, png


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="idrecog compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=str, nargs="+", help="run folders (CSV logs or W&B offline runs)")
    parser.add_argument(
        "--out", type=str, default="report", help="output path without suffix: OUT.md, OUT.png"
    )
    args = parser.parse_args(argv)
    runs = find_runs(list(args.runs))
    md, png = write_report(runs, args.out)
    print(f"{len(runs)} runs; wrote {md} and {png}")
    return 0
