"""The packed (LitData) format: ``idrecog data pack`` writes shards that stream, from a folder and from an
S3-compatible server the test starts itself (moto, on 127.0.0.1), into the same batches as the folder format
(frames, masks, user features and all); and a 2-process DDP fit on CPU streams it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("litdata")

from idrecog.cli.data import main as data_main
from idrecog.data.datamodule import IdDataModule
from idrecog.data.stream import _decode_files, _encode_files, pack_dataset
from idrecog.errors import ConfigError
from tests.conftest import make_tiny_dataset, run_ddp_worker


def _dm(root: str, fmt: str, tmp: Path, **kw: Any) -> IdDataModule:
    dm = IdDataModule(
        root=root,
        format=fmt,
        img_size=(64, 96),
        batch_size=4,
        num_workers=0,
        preflight_cache_dir="",
        stream_cache_dir=str(tmp / "cache") if fmt == "litdata" else None,
        **kw,
    )
    dm.configure(load_frames=True)
    return dm


def _batches(loader: Any) -> list[dict[str, Any]]:
    return list(loader)


def _assert_same(a: Any, b: Any, where: str = "batch") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("stream")
    root = make_tiny_dataset(tmp / "folder", n_train=10, n_val=7, n_test=3)
    out = tmp / "packed"
    # small shards: several per split, so ranks and the shuffle have chunks to share out
    assert data_main(["pack", str(root), "--out", str(out), "--chunk_bytes", "40KB"]) == 0
    return root, out


def test_record_blobs_round_trip_and_refuse_foreign_bytes() -> None:
    files = {"images/a.png": b"\x89PNG...", "masks/a.png": b"", "frames/a f.jpg": bytes(range(256))}
    assert _decode_files(_encode_files(files)) == files
    with pytest.raises(Exception, match="bad magic"):
        _decode_files(b"\x80\x04pickle")


def test_pack_writes_shards_manifests_and_summary(packed: tuple[Path, Path]) -> None:
    root, out = packed
    summary = json.loads((out / "pack.json").read_text())
    assert summary["splits"] == {"train": {"samples": 10}, "val": {"samples": 7}, "test": {"samples": 3}}
    for split in ("train", "val", "test"):
        assert (out / split / "index.json").is_file()
        assert (out / f"{split}.jsonl").read_text() == (root / f"{split}.jsonl").read_text()
    assert (out / "tasks.yaml").read_text() == (root / "tasks.yaml").read_text()


@pytest.mark.parametrize("split", ["train", "val"])
def test_packed_batches_equal_the_folder_batches(
    packed: tuple[Path, Path], tmp_path: Path, split: str
) -> None:
    """Unshuffled, the same seed: identical batches (images, every task's targets incl. masks and boxes, the
    applies/present masks, frames, user features, ids) through the same transforms (train: augmentation on)."""
    root, out = packed
    got = {}
    for fmt, where in (("folder", root), ("litdata", out)):
        dm = _dm(str(where), fmt, tmp_path, augment=True, seed=3)
        dm.setup("fit")
        loader = dm._loader(split, shuffle=False)
        torch.manual_seed(123)  # the augmentation's draws
        got[fmt] = _batches(loader)
    assert len(got["folder"]) == len(got["litdata"]) > 1
    assert "assoc" in got["folder"][0] and "user" in got["folder"][0]
    _assert_same(got["folder"], got["litdata"])


def test_shuffled_stream_covers_the_split_once_and_depends_on_the_seed(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = packed

    def order(seed: int) -> list[str]:
        dm = _dm(str(out), "litdata", tmp_path, seed=seed)
        dm.setup("fit")
        return [i for b in dm.train_dataloader() for i in b["ids"]]

    a, b = order(0), order(0)
    assert a == b and sorted(a) == [f"train_{i:03d}" for i in range(10)]
    assert any(order(s) != a for s in (1, 2, 3))


def test_streaming_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import streaming

    streaming.main(["--smoke", "--root", str(tmp_path / "bench"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "| litdata | 0 |" in out and "| folder | 0 |" in out and "vs folder" in out


def test_format_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.format"):
        IdDataModule(root=str(tmp_path), format="tfrecord")
    with pytest.raises(ConfigError, match=r"data\.root"):
        IdDataModule(root="s3://bucket/x", format="folder")
    with pytest.raises(ConfigError, match=r"data\.root.*idrecog data pack"):
        IdDataModule(root=str(tmp_path / "nothing"), format="litdata").setup("fit")


# ---------------------------------------------------------------------------------------------- S3
@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's S3-compatible server on 127.0.0.1 (an ephemeral port), stopped at the end; boto3 (and so LitData)
    finds it through the environment variables a real deployment sets."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.delenv(k, raising=False)
        # LitData moves chunks with obstore, whose client refuses plain http unless told (a real bucket is https)
        from litdata.streaming import downloader

        monkeypatch.setattr(
            downloader, "_OBSTORE_CLIENT_OPTIONS", {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": True}
        )
        import boto3

        boto3.client("s3").create_bucket(Bucket="idrecog-test")
        yield "s3://idrecog-test"
    finally:
        server.stop()


def test_pack_to_and_stream_from_s3(packed: tuple[Path, Path], tmp_path: Path, s3_server: str) -> None:
    root, _ = packed
    url = f"{s3_server}/packs/tiny"
    summary = pack_dataset(root, url, splits=("train", "val"))
    assert summary["splits"]["val"] == {"samples": 7}
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="idrecog-test")["Contents"]}
    assert {"packs/tiny/tasks.yaml", "packs/tiny/val.jsonl", "packs/tiny/val/index.json"} <= keys
    got = {}
    for fmt, where in (("folder", str(root)), ("litdata", url)):
        dm = _dm(where, fmt, tmp_path, augment=False)
        dm.setup("validate")
        got[fmt] = _batches(dm.val_dataloader())
    _assert_same(got["folder"], got["litdata"])


# ---------------------------------------------------------------------------------------------- DDP
WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import lightning as L
    import torch
    from idrecog.data.datamodule import IdDataModule
    from tests.test_ddp import build_module

    packed, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = IdDataModule(root=packed, format="litdata", img_size=(64, 96), batch_size=2, num_workers=0,
                      augment=False, stream_cache_dir=str(out / "cache"))
    module = build_module(dm.catalogue.to_dict())
    seen = []

    class Ids(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(batch["ids"])

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Ids()],
    )
    trainer.fit(module, datamodule=dm)
    r = trainer.global_rank
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, out / f"rank{r}.pt")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    (out / f"rank{r}.json").write_text(json.dumps({"step": trainer.global_step, "ids": seen, "metrics": metrics}))
    """
)


@pytest.mark.slow  # two fresh interpreters importing torch, Lightning and LitData on 2 cores
def test_two_process_ddp_streams_disjoint_shards_and_ends_with_identical_weights(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out_packed = packed
    out = tmp_path / "out"
    out.mkdir()
    run_ddp_worker(WORKER, [str(out_packed), str(out)], tmp_path, timeout=300)
    sd0, sd1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0), "weights differ across ranks"
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] > 0
    # each epoch, the ranks read disjoint samples of the train split
    per_epoch = len(r0["ids"]) // 2
    for e in range(2):
        a = set(r0["ids"][e * per_epoch : (e + 1) * per_epoch])
        b = set(r1["ids"][e * per_epoch : (e + 1) * per_epoch])
        assert a and b and not (a & b), (a, b)
    assert "val/score" in r0["metrics"] and r0["metrics"]["val/score"] == pytest.approx(
        r1["metrics"]["val/score"]
    )
