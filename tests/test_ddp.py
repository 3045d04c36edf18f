"""Two-process DDP on CPU (gloo): both ranks end with identical weights, and the validation metrics logged under
DDP equal a single-process evaluation of the same data, including a task labelled on one rank's shard only
(whose metric sync used to be skipped on the other rank, see ``idrecog.tasks.base.metrics_updated``).

The DDP run is a subprocess (``strategy="ddp"``: Lightning re-launches the script for rank 1), so pytest's own
process never initialises ``torch.distributed``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from idrecog.data.datamodule import IdDataModule
from idrecog.lit.unified import UnifiedModule
from tests.conftest import make_tiny_dataset, run_ddp_worker
from tests.test_model_fakes import tiny_parts

N_VAL = 8  # divisible by world size x batch size: DistributedSampler pads nothing
BATCH = 2
ONE_SHARD_TASK = (
    "tampering"  # labelled on even val lines only = rank 0's shard (no shuffle: rank r gets r::2)
)


def build_module(catalogue: dict[str, Any]) -> UnifiedModule:
    torch.manual_seed(0)
    return UnifiedModule(
        catalogue=catalogue, **tiny_parts(), task_options={"detection": {"num_queries": 8}}, warmup_steps=1
    )


def build_datamodule(root: Path) -> IdDataModule:
    return IdDataModule(root=str(root), img_size=(64, 96), batch_size=BATCH, num_workers=0, augment=False)


WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import lightning as L
    import torch
    from tests.test_ddp import build_datamodule, build_module

    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(root)
    module = build_module(dm.catalogue.to_dict())
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    r = trainer.global_rank
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, out / f"rank{r}.pt")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    (out / f"rank{r}.json").write_text(json.dumps({"global_step": trainer.global_step, "metrics": metrics}))
    """
)


def _dataset(root: Path) -> Path:
    make_tiny_dataset(root, n_train=8, n_val=N_VAL, n_test=2)
    lines = [json.loads(x) for x in (root / "val.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        if i % 2:
            line["labels"][ONE_SHARD_TASK] = None
        else:
            assert line["labels"].get(ONE_SHARD_TASK) is not None
    (root / "val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.mark.slow  # ~80 s on a shared 2-core machine: two fresh interpreters importing torch and Lightning
def test_two_process_ddp_identical_weights_and_metrics_equal_single_process(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    run_ddp_worker(WORKER, [str(root), str(out)], tmp_path, timeout=240)

    # 1. both ranks hold identical weights, and training moved them
    sd0, sd1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert sd0.keys() == sd1.keys()
    diff = [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    assert not diff, f"parameters/buffers differ across ranks: {diff[:5]}"
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["global_step"] == r1["global_step"] == 4  # 2 epochs x (8 samples / 2 ranks / batch 2)
    init = build_module(build_datamodule(root).catalogue.to_dict()).state_dict()
    moved = [k for k, v in init.items() if v.is_floating_point() and not torch.equal(v, sd0[k])]
    assert any(k.startswith("model.decoder.") for k in moved), "training did not move the decoder"

    # 2. the DDP-logged validation metrics: the same on both ranks, and equal to one process over all the data
    dm = build_datamodule(root)
    module = build_module(dm.catalogue.to_dict())
    module.load_state_dict(sd0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    single = {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}
    ddp0, ddp1 = r0["metrics"], r1["metrics"]
    # per-task metrics and the score are sample-decomposable; val/loss averages per-batch means, whose batches
    # differ between one process ([0, 1], [2, 3]...) and two ranks ([0, 2] | [1, 3]...), so it is left out
    keys = sorted(k for k in single if k.startswith("val/") and k.count("/") == 2 and not k.endswith("/loss"))
    keys.append("val/score")
    assert f"val/{ONE_SHARD_TASK}/accuracy" in keys, keys
    for k in keys:
        assert k in ddp0 and k in ddp1, f"{k} not logged under DDP"
        assert ddp0[k] == pytest.approx(ddp1[k], abs=1e-6), f"{k}: rank 0 {ddp0[k]} != rank 1 {ddp1[k]}"
        assert ddp0[k] == pytest.approx(single[k], abs=1e-4), (
            f"{k}: DDP {ddp0[k]} != single process {single[k]}"
        )
    # the per-task loss meters are count-weighted sums, so they also match across the two layouts
    for task in ("doc_type", ONE_SHARD_TASK, "image_quality"):
        k = f"val/{task}/loss"
        assert ddp0[k] == pytest.approx(single[k], rel=1e-4, abs=1e-5), k
