"""The table of ``benchmarks/gpu_config_seeds.sh``: one row per run (its log and CSV metrics under WORK).

python -m benchmarks.config_seeds_table runs/gpu_cs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

COLUMNS = [  # (header, task, metric) read from the `idrecog test` table
    ("doc_type acc", "doc_type", "accuracy"),
    ("card_mask mIoU", "card_mask", "miou"),
    ("image_quality MAE", "image_quality", "mae"),
    ("visibility acc", "visibility", "accuracy"),
    ("fields mAP@50", "fields", "map_50"),
    ("tampering F1", "tampering", "f1_macro"),
    ("hologram acc", "hologram", "accuracy"),
    ("nationality_match acc", "nationality_match", "accuracy"),
]


def row(log: Path, run_dir: Path) -> list[str]:
    text = log.read_text(errors="replace")
    test = text[text.rfind("test metrics") :] if "test metrics" in text else ""

    def metric(task: str, name: str) -> str:
        m = re.search(rf"^{task}\s.*?\b{name}=([0-9.]+)", test, re.M)
        return m.group(1) if m else "-"

    score = re.search(r"\[test\] score=([0-9.]+)", test)
    last = run_dir / "checkpoints" / "last.ckpt"
    steps = torch.load(last, map_location="cpu", weights_only=True)["global_step"] if last.is_file() else 0
    wall = re.search(r"fit wall (\d+)", text)
    return [
        log.stem,
        str(steps or "-"),
        score.group(1) if score else "-",
        *(metric(task, name) for _, task, name in COLUMNS),
        wall.group(1) if wall else "-",
    ]


def main(work: str) -> None:
    root = Path(work)
    head = ["run", "steps", "test/score", *(h for h, _, _ in COLUMNS), "fit s"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for log in sorted((root / "logs").glob("*_s*.log")):
        print("| " + " | ".join(row(log, root / log.stem)) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
