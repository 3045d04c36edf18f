"""``idrecog synth``: generate the synthetic identity-document benchmark folder."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from idrecog.errors import ConfigError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="idrecog synth",
        description="Generate the synthetic identity-document benchmark.",
        exit_on_error=False,
    )
    p.add_argument("--out", type=str, required=True, help="dataset folder to create")
    p.add_argument("--train", type=int, default=2000, help="training samples")
    p.add_argument("--val", type=int, default=300, help="validation samples")
    p.add_argument("--test", type=int, default=300, help="test samples")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    p.add_argument("--height", type=int, default=160, help="image height in pixels")
    p.add_argument("--width", type=int, default=256, help="image width in pixels")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--missing-fraction", type=float, default=0.10, help="fraction of labels blanked to null")
    p.add_argument(
        "--drop-doc-type", type=float, default=0.0, help="fraction of train samples without doc_type"
    )
    p.add_argument(
        "--frames",
        default="handheld",
        help="flash/angle frames: handheld (own pose, exposure, focus per frame) or registered (pixel-aligned control)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    from idrecog.synth.generate import generate_dataset

    try:
        args = build_parser().parse_args(argv)
    except Exception as e:  # jsonargparse raises its own error type with exit_on_error=False
        raise ConfigError(" ".join(str(e).split()) or "invalid arguments") from None
    # the options are generate_dataset's keyword arguments, under the same names; --no-progress turns one off
    opts = args.as_dict()
    progress = not opts.pop("no_progress")
    out = generate_dataset(opts.pop("out"), progress=progress, **opts)
    print(f"wrote {args.train} train, {args.val} val, {args.test} test samples to {out}")
    return 0
