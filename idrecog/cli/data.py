"""``idrecog data check DIR``, ``idrecog data show DIR --out grid.png``, ``idrecog data cues DIR --out cues.png`` and
``idrecog data pack DIR --out PACKED`` (jsonargparse)."""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from idrecog.data.manifest import SPLITS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="idrecog data", description="Dataset tools for a dataset folder (docs/data-format.md)."
    )
    sub = parser.add_subcommands(dest="subcommand", required=True)

    check = ArgumentParser(
        description="Validate every manifest line and referenced file; print a summary. Exit 1 on any problem."
    )
    check.add_argument("dir", type=str, help="the dataset folder (tasks.yaml, {train,val,test}.jsonl)")
    check.add_argument("--splits", type=list[str], default=list(SPLITS), help="manifests to check")
    check.add_argument(
        "--allow_external_paths", type=bool, default=False, help="allow absolute and '..' paths"
    )
    check.add_argument(
        "--mask_samples", type=int, default=32, help="masks per task sampled for the pixel fractions"
    )
    sub.add_subcommand("check", check, help="validate a dataset folder")

    show = ArgumentParser(
        description="Draw a grid of samples with masks, boxes, labels and frames into a PNG."
    )
    show.add_argument("dir", type=str, help="the dataset folder")
    show.add_argument("--split", type=str, default="train", help="which manifest to draw from")
    show.add_argument("--n", type=int, default=16, help="number of samples")
    show.add_argument("--seed", type=int, default=0, help="seed of the random pick")
    show.add_argument("--out", type=str, required=True, help="the PNG to write")
    show.add_argument("--tile_width", type=int, default=320, help="pixel width of each sample's image")
    show.add_argument(
        "--allow_external_paths", type=bool, default=False, help="allow absolute and '..' paths"
    )
    sub.add_subcommand("show", show, help="draw samples into a PNG grid")

    cues = ArgumentParser(
        description="Draw the anti-fraud cues: genuine vs forged crops around each label's evidence and the frames of "
        "a capture, at the stored resolution and as the model sees them, into a PNG."
    )
    cues.add_argument("dir", type=str, help="the dataset folder")
    cues.add_argument(
        "--task", type=str, default="tampering", help="the classification task whose classes to compare"
    )
    cues.add_argument(
        "--frames_task", type=str | None, default="hologram", help="a multi-frame task whose captures to draw"
    )
    cues.add_argument("--split", type=str, default="val", help="which manifest to draw from")
    cues.add_argument("--per_class", type=int, default=2, help="samples per class")
    cues.add_argument("--img_size", type=tuple[int, int], default=(160, 256), help="(H, W) the model reads")
    cues.add_argument("--out", type=str, required=True, help="the PNG to write")
    cues.add_argument(
        "--allow_external_paths", type=bool, default=False, help="allow absolute and '..' paths"
    )
    sub.add_subcommand("cues", cues, help="draw genuine vs forged crops and capture frames into a PNG")

    pack = ArgumentParser(
        description="Write LitData shards of a dataset folder (images, frames, label files and manifests) to a "
        "folder or an s3:// URL, for data.format: litdata (docs/data-format.md, 'Packed datasets')."
    )
    pack.add_argument("dir", type=str, help="the dataset folder (tasks.yaml, {train,val,test}.jsonl)")
    pack.add_argument("--out", type=str, required=True, help="a folder or s3://bucket/prefix")
    pack.add_argument("--splits", type=list[str], default=list(SPLITS), help="manifests to pack")
    pack.add_argument("--chunk_bytes", type=str, default="64MB", help="shard size")
    pack.add_argument(
        "--workers", type=int, default=1, help="packing processes (1 keeps the manifest order in the shards)"
    )
    pack.add_argument(
        "--allow_external_paths", type=bool, default=False, help="allow absolute and '..' paths"
    )
    sub.add_subcommand("pack", pack, help="write LitData shards for streaming (data.format: litdata)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``idrecog data``; returns the exit code (check: 1 when problems were found)."""
    cfg = build_parser().parse_args(list(argv) if argv is not None else None)
    if cfg.subcommand == "check":
        from idrecog.data.check import run_check

        c = cfg.check
        return run_check(
            c.dir, splits=c.splits, allow_external_paths=c.allow_external_paths, mask_samples=c.mask_samples
        )
    if cfg.subcommand == "pack":
        from idrecog.data.stream import pack_dataset

        p = cfg.pack
        summary = pack_dataset(
            p.dir,
            p.out,
            splits=p.splits,
            chunk_bytes=p.chunk_bytes,
            num_workers=p.workers,
            allow_external_paths=p.allow_external_paths,
        )
        counts = ", ".join(f"{k}: {v['samples']}" for k, v in summary["splits"].items())
        print(f"packed {counts} samples to {p.out}")
        return 0
    if cfg.subcommand == "cues":
        from idrecog.data.show import show_cues

        c = cfg.cues
        out = show_cues(
            c.dir,
            task=c.task,
            frames_task=c.frames_task,
            split=c.split,
            per_class=c.per_class,
            img_size=tuple(c.img_size),
            out=c.out,
            allow_external_paths=c.allow_external_paths,
        )
        print(f"wrote {out}")
        return 0
    from idrecog.data.show import show_samples

    s = cfg.show
    if s.split not in SPLITS:
        from idrecog.errors import ConfigError

        raise ConfigError(f"--split must be one of {SPLITS}, got {s.split!r}")
    out = show_samples(
        s.dir,
        split=s.split,
        n=s.n,
        seed=s.seed,
        out=s.out,
        tile_width=s.tile_width,
        allow_external_paths=s.allow_external_paths,
    )
    print(f"wrote {out}")
    return 0
