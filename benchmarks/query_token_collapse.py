"""Do a task's query tokens stay distinct? The text design with its projection started at zero, combined by
adding (``add``) or by FiLM (``film``), trained with AdamW to pull every token of every task to its own random
target (what the segmentation and detection heads need: one token per class / object).

Prints, every ``--every`` steps, the mean pairwise cosine similarity of card_mask's tokens, the loss and the
norm of the text's part. docs/task-queries.md ("Combining") quotes a run of this script:

    .venv/bin/python -m benchmarks.query_token_collapse --steps 200 --every 25
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from idrecog.models.queries import module_key
from idrecog.models.queries_text import TextQueries
from idrecog.tasks.catalogue import default_catalogue


def mean_cos(q: torch.Tensor) -> float:
    """q: [K, D] -> mean cosine similarity over the K * (K - 1) pairs of distinct tokens."""
    qn = F.normalize(q, dim=-1)
    s = qn @ qn.T
    k = q.shape[0]
    return float((s.sum() - s.diagonal().sum()) / (k * (k - 1)))


def run(combine: str, steps: int, every: int, dim: int, model_dir: str | None, seed: int) -> None:
    cat = default_catalogue()
    counts = {
        s.name: 16 if s.type == "detection" else (len(s.classes) if s.type == "segmentation" else 1)
        for s in cat
    }
    torch.manual_seed(seed)
    p = TextQueries(model_dir=model_dir, combine="film")  # film: the projection starts at zero
    p.build(cat, counts, dim)
    p.combine = combine  # same start for both; only how the text enters differs
    opt = torch.optim.AdamW(p.parameters(), lr=2e-3, weight_decay=0.05)
    target = torch.randn(sum(counts.values()), dim)
    print(f"combine={combine}")
    for step in range(steps + 1):
        q = p(cat.names, 1)[0]
        loss = (F.layer_norm(q, (dim,)) - target).pow(2).mean()
        if step % every == 0:
            with torch.no_grad():
                text = p.proj(p.task_embeddings()).norm(dim=-1).mean()
                tok = p.offsets[module_key("card_mask")].norm(dim=-1).mean()
                cm = mean_cos(p(["card_mask"], 1)[0])
            print(
                f"  step {step:4d}: card_mask token cosine {cm:+.3f}, loss {loss.item():.3f}, "
                f"|text part| {text:.2f}, |offsets| {tok:.2f}"
            )
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--dim", type=int, default=128, help="decoder width (unified.yaml: 128)")
    ap.add_argument("--model-dir", default=None, help="text encoder folder (default: the packaged MiniLM)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for combine in ("add", "film"):
        run(combine, args.steps, args.every, args.dim, args.model_dir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
