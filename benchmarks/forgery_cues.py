"""How large the benchmark's forgery cues are at the resolution a model reads, and how far hand-held frames move.

Renders samples as ``idrecog synth`` does, at each resolution asked for, and prints per forgery the median and
10th percentile of: the cue region (the pasted photo with its halo, the edited field) in image pixels, its finest
detail (the halo's width, the edited text's height), and, for hologram captures, how far the hologram moves
between the main image and each hand-held frame (in pixels and in hologram widths).

    python -m benchmarks.forgery_cues --samples 400 --sizes 160x256 320x512
"""

from __future__ import annotations

import argparse

import numpy as np

from idrecog.synth.generate import render_sample


def measure(samples: int, height: int, width: int, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for i in range(samples):
        r = render_sample(seed, "val", i, height=height, width=width)
        kind = r["tampering_drawn"]
        if kind != "genuine" and r["labels"].get("tampering") == kind and r["cue_box"] is not None:
            x0, y0, x1, y1 = r["cue_box"]
            d = out.setdefault(kind, {"width": [], "height": [], "detail": []})
            d["width"].append(x1 - x0)
            d["height"].append(y1 - y0)
            d["detail"].append(r["cue_detail_px"])
        holo = next((f["box"] for f in r["labels"]["fields"] if f["label"] == "hologram"), None)
        if r["frames"] and holo is not None:
            d = out.setdefault("hologram frames", {"shift": [], "shift_in_widths": []})
            c = np.array([(holo[0] + holo[2]) / 2, (holo[1] + holo[3]) / 2])
            for b in r["frame_hologram_boxes"]:
                if b is not None:
                    shift = float(np.linalg.norm(np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]) - c))
                    d["shift"].append(shift)
                    d["shift_in_widths"].append(shift / max(holo[2] - holo[0], 1e-6))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--sizes", nargs="+", default=["160x256", "320x512"], help="HxW resolutions")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| size | what | n | measure | median | 10th percentile |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for what, stats in measure(args.samples, h, w, args.seed).items():
            for name, values in stats.items():
                v = np.asarray(values, float)
                print(
                    f"| {w}x{h} | {what} | {len(v)} | {name} | {np.median(v):.1f} | {np.percentile(v, 10):.1f} |"
                )


if __name__ == "__main__":
    main()
