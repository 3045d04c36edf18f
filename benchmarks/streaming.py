"""Streaming: items/s of the packed LitData format (``data.format: litdata``) against the folder format, through
the same ``IdDataModule`` train loader (decode, transforms, collation), and the time ``idrecog data pack`` takes.

    python -m benchmarks.streaming [--train 512] [--workers 0 1] [--repeats 3] [--root data/bench_stream] [--smoke]

The dataset is the synthetic benchmark at the default size (160 x 256), generated into ``ROOT/folder`` on first
use and packed into ``ROOT/packed`` (timed). Each row iterates one epoch of ``train_dataloader()`` (shuffled, the
default config's batch size and augmentation, images not cached: a stream reads each image once per epoch),
after one batch of start-up; formats alternate per repeat; medians. The packed rows read a local folder (LitData
copies the shards into its cache on the first pass, so later passes read the cache, as a warm object-storage
stream does).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import UNIFIED_CONFIG, ensure_dataset, load_yaml, write_results


def items_per_second(root: Path, fmt: str, workers: int, cache: Path, batch_size: int | None = None) -> float:
    from idrecog.data.datamodule import IdDataModule

    data = load_yaml(UNIFIED_CONFIG)["data"]
    dm = IdDataModule(
        root=str(root),
        format=fmt,
        img_size=tuple(data["img_size"]),
        batch_size=batch_size or data["batch_size"],
        augment=data["augment"],
        num_workers=workers,
        persistent_workers=False,
        stream_cache_dir=str(cache) if fmt == "litdata" else None,
        preflight_cache_dir="",
    )
    dm.configure(load_frames=False)  # the default config's learned queries read no frames
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # start-up: workers, first chunk
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += len(batch["ids"])
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("data/bench_stream"))
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench_streaming"))
    p.add_argument("--smoke", action="store_true", help="a tiny setting that only checks the script works")
    args = p.parse_args(argv)
    size = (160, 256)
    if args.smoke:
        # batches of 4, so that batches remain after the start-up one
        vars(args).update({"train": 16, "repeats": 1, "workers": [0], "threads": 1})
        size = (64, 96)
    torch.set_num_threads(args.threads)
    folder = ensure_dataset(args.root / "folder", args.train, 4 if args.smoke else 32, size, workers=1)
    packed = args.root / "packed"
    from idrecog.data.stream import pack_dataset

    shutil.rmtree(packed, ignore_errors=True)
    t0 = time.perf_counter()
    pack_dataset(folder, str(packed), splits=("train", "val"))
    pack_s = time.perf_counter() - t0
    sizes = {
        "folder_mb": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20,
        "packed_mb": sum(f.stat().st_size for f in (packed / "train").rglob("*") if f.is_file()) / 2**20,
    }
    print(f"[bench] packed {args.train} samples in {pack_s:.1f} s ({sizes})", flush=True)
    rates: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for w in args.workers:
            for fmt in ("folder", "litdata") if r % 2 == 0 else ("litdata", "folder"):
                cache = args.out / "cache"
                rate = items_per_second(
                    folder if fmt == "folder" else packed, fmt, w, cache, 4 if args.smoke else None
                )
                rates.setdefault(f"{fmt} w{w}", []).append(rate)
                print(f"[bench] {fmt} workers={w} repeat {r}: {rate:.1f} items/s", flush=True)
    lines = [
        f"{args.train} train samples at {size[0]}x{size[1]}, batch {4 if args.smoke else 32}, one epoch per row, median of {args.repeats}; "
        f"pack: {pack_s:.1f} s",
        "",
        "| format | workers | items/s (median) | runs | vs folder |",
        "|---|---:|---:|---|---:|",
    ]
    for w in args.workers:
        base = statistics.median(rates[f"folder w{w}"])
        for fmt in ("folder", "litdata"):
            rs = rates[f"{fmt} w{w}"]
            med = statistics.median(rs)
            runs = ", ".join(f"{x:.0f}" for x in rs)
            lines.append(f"| {fmt} | {w} | {med:.1f} | {runs} | {med / base:.2f}x |")
    md = "\n".join(lines)
    print(md)
    write_results(args.out, {"pack_s": pack_s, **sizes, "rates": rates, "args": vars(args)}, md)


if __name__ == "__main__":
    main()
