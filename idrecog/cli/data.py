"""``idrecog data check DIR``, ``idrecog data show DIR --out grid.png``, ``idrecog data cues DIR --out cues.png`` and
``idrecog data pack DIR --out PACKED`` (jsonargparse)."""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from idrecog.data.manifest import SPLITS


def _dataset_parser(description: str, dir_help: str = "the dataset folder") -> ArgumentParser:
    """A subcommand's parser with what every subcommand reads: the dataset folder and its path policy."""
    p = ArgumentParser(description=description)
    p.add_argument("dir", type=str, help=dir_help)
    p.add_argument("--allow_external_paths", type=bool, default=False, help="allow absolute and '..' paths")
    return p


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="idrecog data", description="Dataset tools for a dataset folder (docs/data-format.md)."
    )
    sub = parser.add_subcommands(dest="subcommand", required=True)
    full_dir = "the dataset folder (tasks.yaml, {train,val,test}.jsonl)"

    check = _dataset_parser(
        "Validate every manifest line and referenced file; print a summary. Exit 1 on any problem.", full_dir
    )
    check.add_argument("--splits", type=list[str], default=list(SPLITS), help="manifests to check")
    check.add_argument(
        "--mask_samples", type=int, default=32, help="masks per task sampled for the pixel fractions"
    )
    sub.add_subcommand("check", check, help="validate a dataset folder")

    show = _dataset_parser("Draw a grid of samples with masks, boxes, labels and frames into a PNG.")
    show.add_argument("--split", type=str, default="train", help="which manifest to draw from")
    show.add_argument("--n", type=int, default=16, help="number of samples")
    show.add_argument("--seed", type=int, default=0, help="seed of the random pick")
    show.add_argument("--out", type=str, required=True, help="the PNG to write")
    show.add_argument("--tile_width", type=int, default=320, help="pixel width of each sample's image")
    sub.add_subcommand("show", show, help="draw samples into a PNG grid")

    cues = _dataset_parser(
        "Draw the anti-fraud cues: genuine vs forged crops around each label's evidence and the frames of "
        "a capture, at the stored resolution and as the model sees them, into a PNG."
    )
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
    sub.add_subcommand("cues", cues, help="draw genuine vs forged crops and capture frames into a PNG")

    pack = _dataset_parser(
        "Write LitData shards of a dataset folder (images, frames, label files and manifests) to a "
        "folder or an s3:// URL, for data.format: litdata (docs/data-format.md, 'Packed datasets').",
        full_dir,
    )
    pack.add_argument("--out", type=str, required=True, help="a folder or s3://bucket/prefix")
    pack.add_argument("--splits", type=list[str], default=list(SPLITS), help="manifests to pack")
    pack.add_argument("--chunk_bytes", type=str, default="64MB", help="shard size")
    pack.add_argument(
        "--workers", type=int, default=1, help="packing processes (1 keeps the manifest order in the shards)"
    )
    sub.add_subcommand("pack", pack, help="write LitData shards for streaming (data.format: litdata)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``idrecog data``; returns the exit code (check: 1 when problems were found)."""
    cfg = build_parser().parse_args(list(argv) if argv is not None else None)
    # each subcommand's options are its tool's keyword arguments, under the same names
    opts = cfg[cfg.subcommand].as_dict()
    root = opts.pop("dir")
    if cfg.subcommand == "check":
        from idrecog.data.check import run_check

        return run_check(root, **opts)
    if cfg.subcommand == "pack":
        from idrecog.data.stream import pack_dataset

        summary = pack_dataset(root, num_workers=opts.pop("workers"), **opts)
        counts = ", ".join(f"{k}: {v['samples']}" for k, v in summary["splits"].items())
        print(f"packed {counts} samples to {opts['out']}")
        return 0
    if cfg.subcommand == "cues":
        from idrecog.data.show import show_cues

        print(f"wrote {show_cues(root, **opts)}")
        return 0
    from idrecog.data.show import show_samples

    if opts["split"] not in SPLITS:
        from idrecog.errors import ConfigError

        raise ConfigError(f"--split must be one of {SPLITS}, got {opts['split']!r}")
    print(f"wrote {show_samples(root, **opts)}")
    return 0
