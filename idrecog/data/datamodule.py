"""``IdDataModule``: the dataset folder as a LightningDataModule (``data:`` section of the LightningCLI configs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from idrecog.data.collate import Collator
from idrecog.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, ON_ERROR, IdDataset
from idrecog.data.manifest import SPLITS, Sample
from idrecog.data.preflight import SplitReader
from idrecog.data.resolution import (
    TaskResolver,
    check_task_resolver_args,
    create_task_resolver,
    list_task_resolvers,
)
from idrecog.data.transforms import build_transforms, check_img_size
from idrecog.errors import ConfigError
from idrecog.models.user import UserFeatureEncoder
from idrecog.tasks.catalogue import TaskCatalogue, default_catalogue, load_catalogue

log = logging.getLogger(__name__)

FORMATS = ("folder", "litdata")


class IdDataModule(L.LightningDataModule):
    """A dataset folder (``root/tasks.yaml`` + ``root/{train,val,test}.jsonl``), see docs/data-format.md.

    Args:
        root: the dataset folder.
        synthesize_if_missing: generate the synthetic benchmark into ``root`` in ``prepare_data`` when it has no
            ``tasks.yaml`` (``synth`` holds the keyword arguments of ``idrecog.synth.generate.generate_dataset``).
        synth: e.g. ``{train: 2000, val: 300, test: 300, seed: 0}``.
        img_size: (H, W) of the network input; each a multiple of ``patch_size``.
        patch_size: the encoder's patch size (checked against ``img_size``).
        batch_size, num_workers, pin_memory, persistent_workers: DataLoader settings.
        augment: train-time geometric and photometric augmentation (no flips).
        task_resolver: a registered task resolver (``idrecog.data.resolution.list_task_resolvers()``).
        resolver_args: its keyword arguments, e.g. ``{missing: skip}`` for ``doc_type``.
        eval_task_resolver: the resolver (default arguments) of the val and test splits; None: ``task_resolver``.
            ``annotated`` scores models trained with different resolvers on the same annotated task sets.
        on_error: what a bad sample does (docs/reliability.md). ``raise``: a pre-flight scan of the splits in
            use stops before training on the first problem, naming file, line and field. ``skip``: samples with
            problems (pre-flight, or failing at load time) are dropped, counted by reason and reported at each
            epoch end and in the final summary. ``mask``: no scan; a label that fails to load is masked and
            counted (an unreadable image still raises).
        preflight: run the pre-flight scan (``idrecog data check``'s validation) under ``raise`` and ``skip``.
        preflight_cache_dir: where scan results are cached by manifest and catalogue hash; None:
            ``$IDRECOG_CACHE/preflight`` or ``~/.cache/idrecog/preflight``; "": no cache.
        max_image_pixels: images with more pixels are refused (decompression-bomb guard; also sets PIL's
            ``Image.MAX_IMAGE_PIXELS``); None: PIL's default.
        allow_external_paths: allow absolute and ``..`` paths in manifests.
        limit_train_samples: keep a random subset (seeded) of this many train samples.
        seed: the seed of the train shuffle and of ``limit_train_samples``.
        cache_images: keep decoded images in memory (small datasets only; one copy per worker; with
            ``num_workers > 0`` set ``persistent_workers`` too, or each epoch's new workers start empty).
        load_frames: decode the associated frames of multi-frame tasks. None (default): as the model needs
            (the training CLI passes whether its query provider reads frames to :meth:`configure`; only
            ``multimodal`` does); frames are loaded when nothing says otherwise.
        predict_split: the split ``predict_dataloader`` reads.
        format: ``folder`` (images and manifests in ``root``) or ``litdata``: ``root`` is a packed dataset
            (``idrecog data pack``), a folder or an ``s3://`` URL, streamed with LitData (docs/data-format.md,
            "Packed datasets"); items go through the same task resolution, transforms and collation.
        stream_cache_dir: ``litdata``: the local cache of downloaded shards (None: LitData's default).
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        synthesize_if_missing: bool = False,
        synth: dict | None = None,
        img_size: tuple[int, int] = (160, 256),
        patch_size: int = 16,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        augment: bool = True,
        task_resolver: str = "doc_type",
        resolver_args: dict | None = None,
        eval_task_resolver: str | None = None,
        on_error: str = "raise",
        preflight: bool = True,
        preflight_cache_dir: str | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        allow_external_paths: bool = False,
        limit_train_samples: int | None = None,
        seed: int = 0,
        cache_images: bool = False,
        load_frames: bool | None = None,
        predict_split: str = "test",
        format: str = "folder",
        stream_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise ConfigError(f"data.format must be one of {FORMATS}, got {format!r}")
        if format == "folder" and "://" in root:
            raise ConfigError(
                f"data.root: {root!r} is a URL; set data.format: litdata to stream a packed dataset"
            )
        if format == "litdata" and synthesize_if_missing:
            raise ConfigError(
                "data.synthesize_if_missing: generate a folder, pack it (`idrecog data pack`) and set it false "
                "for data.format: litdata"
            )
        self.format = format
        self.location = root  # the root as given (a URL stays a URL)
        self.stream_cache_dir = stream_cache_dir
        self.root = Path(root)
        self.synthesize_if_missing = synthesize_if_missing
        self.synth = dict(synth or {})
        self.img_size = check_img_size(tuple(img_size), patch_size, "data.img_size")
        self.patch_size = patch_size
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        if on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error must be one of {ON_ERROR}, got {on_error!r}")
        if predict_split not in SPLITS:
            raise ConfigError(f"data.predict_split must be one of {SPLITS}, got {predict_split!r}")
        if limit_train_samples is not None and limit_train_samples < 1:
            raise ConfigError(f"data.limit_train_samples must be >= 1 or null, got {limit_train_samples}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.augment = augment
        self.task_resolver = task_resolver
        self.resolver_args = dict(resolver_args or {})
        # fail fast (e.g. a missing task-classifier checkpoint), before any data is generated or read
        check_task_resolver_args(task_resolver, self.resolver_args)
        self.eval_task_resolver = eval_task_resolver
        if eval_task_resolver is not None:
            if eval_task_resolver not in list_task_resolvers():
                raise ConfigError(
                    f"data.eval_task_resolver: unknown resolver {eval_task_resolver!r}; "
                    f"registered: {', '.join(list_task_resolvers())}"
                )
            check_task_resolver_args(eval_task_resolver, {})
        self.on_error = on_error
        self.preflight = preflight
        self.preflight_cache_dir = preflight_cache_dir
        if max_image_pixels is not None:
            if max_image_pixels < 1:
                raise ConfigError(f"data.max_image_pixels must be >= 1 or null, got {max_image_pixels}")
            from PIL import Image

            # PIL's own guard (every Image.open in this process) uses the same limit
            Image.MAX_IMAGE_PIXELS = max_image_pixels
        self.max_image_pixels = max_image_pixels
        self._reader: SplitReader | None = None
        self._sampler_state: dict[str, int] | None = None
        self.allow_external_paths = allow_external_paths
        self.limit_train_samples = limit_train_samples
        self.seed = seed
        self.cache_images = cache_images
        self.load_frames = load_frames
        self._frames_consumed = True  # until the model says otherwise (see configure)
        self.predict_split = predict_split
        self._catalogue: TaskCatalogue | None = None
        self._user_encoder: UserFeatureEncoder | None = None
        self._train_samples: list[Sample] | None = None
        self.datasets: dict[str, IdDataset] = {}

    # ------------------------------------------------------------------ catalogue and preparation
    def _has_data(self) -> bool:
        if self.format == "litdata":
            if self._catalogue is not None:
                return True
            from idrecog.data.stream import read_packed_catalogue

            try:
                self._catalogue = read_packed_catalogue(self.location)
            except FileNotFoundError:
                return False
            return True
        return (self.root / "tasks.yaml").is_file()

    def _missing_root_error(self) -> ConfigError:
        if self.format == "litdata":
            return ConfigError(
                f"data.root: {self.location!r} holds no packed dataset (no tasks.yaml); write one with "
                "`idrecog data pack DATASET_FOLDER --out ROOT`"
            )
        what = "does not exist" if not self.root.exists() else "has no tasks.yaml"
        return ConfigError(
            f"data.root: dataset folder {str(self.root)!r} {what}; generate it with `idrecog synth --out {self.root}` "
            "or set data.synthesize_if_missing: true"
        )

    @property
    def catalogue(self) -> TaskCatalogue:
        """``root/tasks.yaml``; before the data exists and with ``synthesize_if_missing``, the default catalogue."""
        if self._catalogue is None:
            if self._has_data():
                if self._catalogue is None:  # litdata: _has_data read it
                    self._catalogue = load_catalogue(self.root / "tasks.yaml")
            elif self.synthesize_if_missing:
                return default_catalogue()  # not cached: the generated tasks.yaml wins once it exists
            else:
                raise self._missing_root_error()
        return self._catalogue

    def prepare_data(self) -> None:
        """Generate the synthetic benchmark into ``root`` when it is missing and ``synthesize_if_missing``; refuse a
        folder there that an older generator wrote (its tasks or benchmark version differ from this idrecog's)."""
        if self._has_data():
            if self.synthesize_if_missing:
                self._check_synthetic_version()
            return
        if not self.synthesize_if_missing:
            raise self._missing_root_error()
        from idrecog.synth.generate import generate_dataset

        kwargs = {"progress": True, **self.synth}
        print(
            f"[data] {self.root} has no dataset: generating the synthetic benchmark there ({kwargs})",
            flush=True,
        )
        generate_dataset(self.root, **kwargs)
        print(f"[data] wrote {self.root}", flush=True)

    def _check_synthetic_version(self) -> None:
        """A synthetic benchmark written by another version of the generator is refused (its settings file names
        another version, or it is a version-1 folder, which had none); any other dataset is used as it is."""
        import json

        from idrecog.synth.generate import BENCHMARK_VERSION, SETTINGS_FILE

        settings = self.root / SETTINGS_FILE
        if settings.is_file():
            version = json.loads(settings.read_text()).get("benchmark_version")
        else:
            cat = load_catalogue(self.root / "tasks.yaml")
            v1_tasks = [t for t in default_catalogue().names if t != "presentation_attack"]
            builtin = set(default_catalogue().doc_types or {})
            version = 1 if cat.names == v1_tasks and set(cat.doc_types or {}) == builtin else None
        if version is not None and version != BENCHMARK_VERSION:
            raise ConfigError(
                f"data.root: {self.root} holds version {version} of the synthetic benchmark; this idrecog generates "
                f"version {BENCHMARK_VERSION} (docs/synthetic-benchmark.md): delete the folder to have it generated "
                "again, or set data.synthesize_if_missing: false to use it as it is"
            )

    @property
    def resolver(self) -> TaskResolver:
        return create_task_resolver(self.task_resolver, self.catalogue, **self.resolver_args)

    def _read(self, split: str) -> list[Sample]:
        if self.format == "litdata":
            from idrecog.data.stream import read_packed_manifest

            # the packed manifest was validated and its files read when packing: no pre-flight scan
            return read_packed_manifest(self.location, split, self.catalogue)
        return self.reader.read(split)

    def _read_train(self) -> list[Sample]:
        if self._train_samples is None:
            samples = self._read("train")
            if self.limit_train_samples is not None and self.limit_train_samples < len(samples):
                g = torch.Generator().manual_seed(self.seed)
                keep = sorted(torch.randperm(len(samples), generator=g)[: self.limit_train_samples].tolist())
                samples = [samples[i] for i in keep]
            self._train_samples = samples
        return self._train_samples

    @property
    def reader(self) -> SplitReader:
        """Reads the splits under the ``on_error`` policy (pre-flight scan, drops and their counts)."""
        if self._reader is None:
            self._reader = SplitReader(
                self.root,
                self.catalogue,
                on_error=self.on_error,
                preflight=self.preflight,
                cache_dir=self.preflight_cache_dir,
                allow_external_paths=self.allow_external_paths,
                max_image_pixels=self.max_image_pixels,
            )
        return self._reader

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """{split: {reason: samples}} dropped by the pre-flight scan under ``on_error: skip``."""
        return self._reader.skipped if self._reader is not None else {}

    # ------------------------------------------------------------------ what the model needs from the data
    def configure(
        self, *, load_frames: bool | None = None, user_features: dict[str, Any] | None = None
    ) -> None:
        """What the model decided about the data, set before any dataset is built (the training CLI calls it
        with :meth:`UnifiedModule.data_requirements`). ``load_frames``: whether the model reads associated frames
        (used when ``data.load_frames`` is null); ``user_features``: the model's user-feature encoder state (a
        checkpoint's), so users are encoded as the model was trained."""
        if self.datasets:
            raise RuntimeError("IdDataModule.configure must be called before the datasets are set up")
        if load_frames is not None:
            self._frames_consumed = bool(load_frames)
        if user_features is not None:
            self._user_encoder = UserFeatureEncoder.from_state(user_features)

    def user_features(self) -> dict[str, Any]:
        """The user-feature encoder's state (JSON-able): the configured one, else fitted on the train split."""
        if self._user_encoder is None:
            if not self._has_data():
                raise self._missing_root_error()
            self._user_encoder = UserFeatureEncoder.fit(s.user for s in self._read_train())
        return self._user_encoder.state_dict()

    def label_counts(self) -> dict[str, dict[str, int]]:
        """``{task: {class: samples}}`` of the classification tasks on the train split as training reads it (after
        ``limit_train_samples``, the task resolver and the masking of labels whose frames or user information are
        missing; see ``IdDataset.label_counts``): what ``class_weights: auto`` weighs by. Uses the train dataset
        once it is set up (the resolver runs once), else resolves the split without keeping it."""
        if not self._has_data():
            raise self._missing_root_error()
        ds = self.datasets.get("train") or self._dataset("train", train=True)
        return ds.label_counts()

    @property
    def frames_loaded(self) -> bool:
        """Whether the datasets decode associated frames (``load_frames``, or what the model needs)."""
        return self.load_frames if self.load_frames is not None else self._frames_consumed

    # ------------------------------------------------------------------ datasets
    def _dataset(self, split: str, train: bool, scored: bool = False) -> IdDataset:
        """``scored``: a val or test split (``eval_task_resolver`` resolves it when set)."""
        cat = self.catalogue
        resolver = self.resolver
        if scored and self.eval_task_resolver is not None:
            resolver = create_task_resolver(self.eval_task_resolver, cat)
        needs_user = any(s.uses_user for s in cat)
        samples = self._read_train() if split == "train" else self._read(split)
        return IdDataset(
            self.root,
            split,
            cat,
            resolver=resolver,
            transform=build_transforms("fit" if train else "test", self.img_size, self.augment and train),
            user_encoder=UserFeatureEncoder.from_state(self.user_features()) if needs_user else None,
            on_error=self.on_error,
            allow_external_paths=self.allow_external_paths,
            cache_images=self.cache_images,
            load_frames=self.frames_loaded,
            samples=samples,
            max_image_pixels=self.max_image_pixels,
        )

    def setup(self, stage: str | None = None) -> None:
        if not self._has_data():
            raise self._missing_root_error()
        wanted = {
            "fit": [("train", True), ("val", False)],
            "validate": [("val", False)],
            "test": [("test", False)],
            "predict": [(self.predict_split, False)],
        }
        todo = [x for st, xs in wanted.items() if stage in (None, st) for x in xs]
        for split, train in todo:
            key = "predict" if stage == "predict" else split
            if key in self.datasets:
                continue
            ds = self._dataset(split, train, scored=key in ("val", "test"))
            self.datasets[key] = ds
            missing = {k: v for k, v in ds.manifest_missing_frames().items() if v}
            extra = f"; labelled samples without frames (masked): {missing}" if missing else ""
            dropped = f"; {ds.n_dropped} without any applying task dropped" if ds.n_dropped else ""
            rank_zero_info(
                f"[data] {split}: {len(ds)} samples from {self.root / (split + '.jsonl')}{dropped}{extra}"
            )
        if todo:
            rank_zero_info(f"[data] task resolver: {self.resolver.describe()}")
            if self.eval_task_resolver is not None and any(split != "train" for split, _ in todo):
                rank_zero_info(f"[data] val and test task resolver: {self.eval_task_resolver}")

    def _loader(self, key: str, shuffle: bool) -> DataLoader:
        if key not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[key])
        ds = self.datasets[key]
        if self.format == "litdata":
            return self._stream_loader(key, ds, shuffle)
        sampler = None
        if shuffle:
            from idrecog.data.sampler import ResumableRandomSampler

            # the epoch's order depends on (seed, epoch) only, so a resumed run continues it exactly
            sampler = ResumableRandomSampler(len(ds), self.seed, self.batch_size)
            if self._sampler_state is not None:
                sampler.load_state_dict(self._sampler_state)
                self._sampler_state = None
        return DataLoader(ds, sampler=sampler, **self._loader_options(ds))

    def _loader_options(self, ds: IdDataset) -> dict[str, Any]:
        """What the folder and the stream loaders share: batching, workers and the ``on_error`` collator."""
        if self.on_error == "skip":
            from idrecog.data.collate import SkippingCollator

            collate: Any = SkippingCollator(ds.catalogue)
        else:
            collate = Collator(ds.catalogue)
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    def _stream_loader(self, key: str, ds: IdDataset, shuffle: bool) -> DataLoader:
        from litdata import StreamingDataLoader

        from idrecog.data.stream import PackedSplit

        split = ds.split
        location = (
            f"{self.location.rstrip('/')}/{split}" if "://" in self.location else str(self.root / split)
        )
        stream = PackedSplit(
            location,
            ds,
            shuffle=shuffle,
            seed=self.seed,
            # LitData's default: every sample in one process; under DDP each rank gets as many samples (a rank
            # that ran out would hang the others' collectives: the gradient all-reduce, the metric syncs), so
            # up to world_size - 1 samples of a split are left out
            drop_last=None,
            cache_dir=self.stream_cache_dir,
        )
        return StreamingDataLoader(stream, **self._loader_options(ds))

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The train sampler's position (epoch, batches trained in it), saved in every fit checkpoint."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit" or self.format == "litdata":
            return {}  # litdata: a resumed run starts its epoch over (LitData's own order)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_sampler": {"epoch": int(trainer.current_epoch), "batches_done": int(done)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next train DataLoader starts after the batches the checkpointed run had trained on."""
        state = state_dict.get("train_sampler")
        if state is None:
            return
        self._sampler_state = dict(state)
        import warnings

        # Lightning cannot see the sampler's state and warns that the resume would be inexact; it is exact
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before the epoch"
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
