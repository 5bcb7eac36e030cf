"""FRED RGB+Event detection dataset, batch collation and loaders (spec/fred.md §5.5-5.8).

A sample is one index entry (:mod:`fred.index`) with the streams of the modality: ``rgb``, ``event`` or both
(``dual``). Training applies one synchronised augmentation draw per sample (:mod:`fred.augment`), evaluation the
letterbox only. A training sample's draw comes from ``np.random.default_rng([seed, epoch, position])``, its place
in the epoch's global order (the training sampler hands the dataset :class:`common.data.SampleKey` keys): the
same draws for any number of processes and loader workers, and exactly the same after a resume in the middle of
an epoch. (The spec's per-worker stream ``[seed, rank, epoch, worker_id]`` depends on how batches fall on workers,
so a mid-epoch resume could not reproduce it.)

Typical use (trainer)::

    index = load_fred_index(root, fusion_threshold=0.1)
    target_fn = functools.partial(get_target, input_shape=(640, 640), num_classes=1)
    train_set = FredDataset(index.splits["train"], "dual", (640, 640), train=True, epoch_length=300, seed=11,
                            target_fn=target_fn)
    train_loader = build_loader(train_set, batch_size=8, train=True, num_workers=4, seed=11, rank=rank,
                                world_size=world_size)
    for epoch in ...:
        common.data.set_loader_epoch(train_loader, epoch)
        for batch in train_loader: ...   # batch["rgb"], batch["event"], batch["y_true"], ...
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.data import GlobalBatchSampler, SampleKey, WorkerSeeder
from fred.config import FredConfig
from fred.demo_data import dark_flags, ensure_fred_demo, read_demo_meta
from fred.recipe import stage_batch
from fred.targets import get_target
from fred.augment import compose, draw_augmentation, hsv_jitter, letterbox, letterbox_boxes, letterbox_geometry
from fred.index import (CLASS_NAMES, FrameEntry, FredDataError, FredDataWarning, FredIndex, IndexParams, Sample,
                        load_fred_index, select_samples)

TargetFn = Callable[[np.ndarray], Sequence[np.ndarray]]


def load_frame(path: Path, size: tuple[int, int]) -> Image.Image:
    """Open a frame as PIL RGB, resized (BICUBIC) to ``size`` = (w, h) if it differs. A missing or unreadable
    file raises :class:`FredDataError` naming it."""
    if not path.is_file():
        raise FredDataError(f"missing frame {path}: it is listed in the fusion annotation file; restore the file "
                            "or rebuild the annotations (delete datasets/fred_fusion/annotations)")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise FredDataError(f"cannot read frame {path}: {error}; replace the file or rebuild the annotations") from error
    if rgb.size != tuple(size):
        rgb = rgb.resize(tuple(size), Image.Resampling.BICUBIC)
    return rgb


class FredDataset(Dataset):
    """Samples of one split for one modality.

    Args:
        entries: the split's index entries (``FredIndex.splits[name]``).
        modality: ``rgb``, ``event`` or ``dual``; a sample holds only these streams.
        input_shape: network input (h, w).
        train: augment (one synchronised draw per sample); else letterbox only.
        epoch_length: total epochs T (mosaic/mixup only while epoch < special_aug_ratio·T).
        mosaic, mixup: probabilities (0 disables); mixup only follows a mosaic.
        special_aug_ratio: fraction of T with mosaic/mixup.
        seed: data seed of the per-copy RNG.
        target_fn: boxes [N, 5] in input pixels → the 3 y_true arrays, e.g.
            ``functools.partial(fred.targets.get_target, input_shape=..., num_classes=...)``; None: no targets.
        subset: ``modality`` (training samples of §5.5) or ``paired`` (the effective pairs; evaluation).
            Defaults to ``modality`` when training and ``paired`` otherwise.
        include_unpaired: dual training also serves unpaired frames with the other stream zeroed.
        hsv_gains: HSV jitter ranges (hue, sat, value) for RGB; ``None`` disables the jitter.
        jitter: aspect jitter of the plain path and mosaic tiles.
    """

    def __init__(self, entries: Sequence[FrameEntry], modality: Literal["rgb", "event", "dual"],
                 input_shape: Sequence[int], train: bool, epoch_length: int = 1, mosaic: float = 0.5,
                 mixup: float = 0.5, special_aug_ratio: float = 0.7, seed: int = 0, target_fn: TargetFn | None = None,
                 subset: Literal["modality", "paired"] | None = None, include_unpaired: bool = False,
                 hsv_gains: tuple[float, float, float] | None = (0.1, 0.7, 0.4), jitter: float = 0.3):
        if modality not in ("rgb", "event", "dual"):
            raise ValueError(f"modality must be rgb, event or dual, got {modality!r}")
        self.modality = modality
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        self.train = train
        self.epoch_length = epoch_length
        self.mosaic = mosaic
        self.mixup = mixup
        self.special_aug_ratio = special_aug_ratio
        self.seed = seed
        self.target_fn = target_fn
        self.hsv_gains = hsv_gains
        self.jitter = jitter
        self.subset = subset or ("modality" if train else "paired")
        self.samples: list[Sample] = select_samples(entries, modality, self.subset, include_unpaired)
        # Mosaic/mixup partners share the sample's streams, so a composite never mixes present and missing streams.
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i, sample in enumerate(self.samples):
            groups.setdefault((sample.use_rgb, sample.use_event), []).append(i)
        self._partners = {key: np.asarray(value) for key, value in groups.items()}
        self._resize_warned: set[str] = set()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (the mosaic/mixup gate; keyed draws carry their own epoch)."""
        self.epoch = epoch

    def sample_rng(self, key: SampleKey | int) -> np.random.Generator:
        """The draw RNG of a sample: from its place in the epoch (a :class:`SampleKey`), or for a bare index
        (direct access) from (seed, epoch, index)."""
        if isinstance(key, SampleKey):
            return np.random.default_rng([self.seed, key.epoch, key.position])
        return np.random.default_rng([self.seed, self.epoch, int(key)])

    @property
    def special_allowed(self) -> bool:
        """Mosaic/mixup gate: epoch < special_aug_ratio·T."""
        return self.epoch < self.special_aug_ratio * self.epoch_length

    # ----------------------------------------------------------------------------------------- loading
    def _load(self, index: int) -> tuple[dict[str, Image.Image], np.ndarray]:
        sample = self.samples[index]
        entry = sample.entry
        size = (entry.width, entry.height)
        images = {}
        for name, used, path in (("rgb", sample.use_rgb, entry.rgb_path), ("event", sample.use_event,
                                                                              entry.event_path)):
            if used:
                image = load_frame(path, size)
                images[name] = image
        if sample.use_event and entry.sequence_id not in self._resize_warned:
            with Image.open(entry.event_path) as probe:
                if probe.size != size:
                    warnings.warn(f"sequence {entry.sequence_id}: event frame {entry.event_path} is "
                                  f"{probe.size[0]}x{probe.size[1]}, resized to {size[0]}x{size[1]}",
                                  FredDataWarning, stacklevel=2)
            self._resize_warned.add(entry.sequence_id)
        boxes = np.concatenate([entry.boxes, np.zeros((len(entry.boxes), 1), np.float32)], axis=1)
        return images, boxes

    def draw(self, key: SampleKey | int):
        """The augmentation draw of a sample (a :class:`SampleKey` or an index): a pure function of its key."""
        index = key.index if isinstance(key, SampleKey) else int(key)
        sample = self.samples[index]
        partners = self._partners[(sample.use_rgb, sample.use_event)]
        return draw_augmentation(self.sample_rng(key), index, partners, self.special_allowed, self.mosaic,
                                 self.mixup, self.jitter, self.hsv_gains or (0.0, 0.0, 0.0))

    def __getitem__(self, key: SampleKey | int) -> dict:
        index = key.index if isinstance(key, SampleKey) else int(key)
        sample = self.samples[index]
        entry = sample.entry
        if self.train:
            draw = self.draw(key)
            composite = compose(draw, self._load, self.input_shape)
            images, boxes = composite.images, composite.boxes
            if "rgb" in images and self.hsv_gains is not None:
                images["rgb"] = hsv_jitter(images["rgb"], draw.hsv_gains)
            placement = (float("nan"),) * 4
        else:
            loaded, raw_boxes = self._load(index)
            images = {name: letterbox(image, self.input_shape).astype(np.float32) for name, image in loaded.items()}
            boxes = letterbox_boxes(raw_boxes, (entry.width, entry.height), self.input_shape)
            nw, nh, dx, dy = letterbox_geometry((entry.width, entry.height), self.input_shape)
            placement = (nw / entry.width, nh / entry.height, float(dx), float(dy))
        h, w = self.input_shape
        item = {
            "image_id": entry.image_id,
            "sequence_id": entry.sequence_id,
            "frame_index": entry.frame_index,
            "rgb_timestamp": entry.rgb_timestamp,
            "event_timestamp": entry.event_timestamp,
            "time_diff": entry.time_diff,
            "status": entry.status,
            "drop_rgb": not sample.use_rgb,
            "drop_event": not sample.use_event,
            "orig_size": (entry.height, entry.width),
            "letterbox": placement,
            "boxes": boxes.astype(np.float32),
        }
        for name in self._streams():
            image = images.get(name)
            item[name] = (np.zeros((3, h, w), np.float32) if image is None
                          else np.ascontiguousarray(image.transpose(2, 0, 1) / np.float32(255.0)))
        if self.target_fn is not None:
            item["y_true"] = [np.asarray(y, dtype=np.float32) for y in self.target_fn(item["boxes"])]
        return item

    def _streams(self) -> tuple[str, ...]:
        return {"rgb": ("rgb",), "event": ("event",), "dual": ("rgb", "event")}[self.modality]


def _optional_times(values: Sequence[float | None]) -> torch.Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)


def collate(samples: Sequence[dict]) -> dict:
    """Batch samples into a dict.

    Keys: ``rgb`` and/or ``event`` float32 [B, 3, H, W] in 0..1; ``boxes``: list of B float32 [N_i, 5]
    (x1, y1, x2, y2, class in input pixels); ``y_true``: list of 3 float32 [B, 3, H_l, W_l, 5+nc] (when the
    dataset has a ``target_fn``); ``drop_rgb``/``drop_event`` bool [B] (stream missing, zeroed);
    ``image_id``/``frame_index`` int64 [B]; ``rgb_timestamp``/``event_timestamp``/``time_diff`` float64 [B]
    (NaN where absent); ``orig_size`` int64 [B, 2] (h, w); ``letterbox`` float32 [B, 4] (scale_x, scale_y,
    dx, dy; NaN in training); ``sequence_id``, ``status``: lists of str.
    """
    first = samples[0]
    batch: dict = {}
    for name in ("rgb", "event"):
        if name in first:
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    batch["boxes"] = [torch.from_numpy(s["boxes"]) for s in samples]
    if "y_true" in first:
        batch["y_true"] = [torch.from_numpy(np.stack([s["y_true"][level] for s in samples]))
                           for level in range(len(first["y_true"]))]
    batch["drop_rgb"] = torch.tensor([s["drop_rgb"] for s in samples], dtype=torch.bool)
    batch["drop_event"] = torch.tensor([s["drop_event"] for s in samples], dtype=torch.bool)
    batch["image_id"] = torch.tensor([s["image_id"] for s in samples], dtype=torch.int64)
    batch["frame_index"] = torch.tensor([s["frame_index"] for s in samples], dtype=torch.int64)
    for key in ("rgb_timestamp", "event_timestamp", "time_diff"):
        batch[key] = _optional_times([s[key] for s in samples])
    batch["orig_size"] = torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64)
    batch["letterbox"] = torch.tensor([s["letterbox"] for s in samples], dtype=torch.float32)
    batch["sequence_id"] = [s["sequence_id"] for s in samples]
    batch["status"] = [s["status"] for s in samples]
    return batch


def build_loader(dataset: FredDataset, batch_size: int, train: bool, num_workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over ``dataset`` for one process.

    ``batch_size`` is per process. Training: a :class:`common.data.GlobalBatchSampler` over the global batch
    (order depends only on (seed, epoch); drop_last, so a dataset smaller than one global batch raises
    "dataset too small"; keyed samples seed each draw); evaluation: sequential, keeping the last batch. Workers are
    seeded by :class:`common.data.WorkerSeeder`; ``persistent_workers`` is off so each epoch's workers see the epoch
    set by :func:`common.data.set_loader_epoch`.
    """
    sampler = GlobalBatchSampler(len(dataset), batch_size * world_size, seed=seed, rank=rank, world_size=world_size,
                                 shuffle=train, drop_last=train, keyed=train)
    seeder = WorkerSeeder(seed, rank)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      worker_init_fn=seeder if num_workers > 0 else None, persistent_workers=False)


@dataclass
class FredData:
    """The loaded index and the datasets of one run (evaluation sets use the effective pairs, §5.5)."""

    index: FredIndex
    train: FredDataset
    val: FredDataset
    test: FredDataset
    dark: dict[tuple[str, int], bool] | None

    def eval_set(self, split: str) -> FredDataset:
        """The evaluation dataset of ``split``."""
        return {"train": self.train_eval, "val": self.val, "test": self.test}[split]

    @functools.cached_property
    def train_eval(self) -> FredDataset:
        """The training split as an evaluation set (letterbox only, effective pairs)."""
        return FredDataset(self.index.splits["train"], self.val.modality, self.val.input_shape, train=False)


def load_data(cfg: FredConfig, notify: Callable[[str], None]) -> FredData:
    """Generate the demo dataset if no root is configured, build or reuse the fusion annotations, make datasets."""
    root = cfg.fred_root
    if cfg.uses_demo_data:
        started = time.perf_counter()
        root = ensure_fred_demo(cfg.demo_root, seed=cfg.demo_seed, frames=cfg.demo_frames)
        notify(f"FRED demo dataset in {root} (ready in {time.perf_counter() - started:.1f} s)")
    params = IndexParams(pair_max_dt=cfg.pair_max_dt, event_time_offset=cfg.event_time_offset,
                         rgb_time=cfg.rgb_time, split=cfg.split, val_fraction=cfg.val_fraction)
    index = load_fred_index(root, cfg.fusion_threshold, cfg.annotation_dir, cfg.fusion_annotations, params, notify)
    targets = functools.partial(get_target, input_shape=cfg.input_shape, num_classes=len(CLASS_NAMES))
    train = FredDataset(index.splits["train"], cfg.modality, cfg.input_shape, train=True, epoch_length=cfg.epochs,
                        mosaic=cfg.mosaic, mixup=cfg.mixup, special_aug_ratio=cfg.special_aug_ratio, seed=cfg.seed,
                        target_fn=targets, include_unpaired=cfg.include_unpaired and cfg.modality == "dual")
    val = FredDataset(index.splits["val"], cfg.modality, cfg.input_shape, train=False, target_fn=targets)
    test = FredDataset(index.splits["test"], cfg.modality, cfg.input_shape, train=False)
    if len(train) == 0:
        wanted = (f"annotated RGB/event pairs within --fusion-threshold {cfg.fusion_threshold} s"
                  if cfg.modality == "dual" else f"annotated {cfg.modality} frames")
        raise FredDataError(f"the train split of {index.fred_root} has no {wanted}; check the data, the split files "
                            "and --fusion-threshold")
    meta = read_demo_meta(index.fred_root)
    return FredData(index=index, train=train, val=val, test=test, dark=dark_flags(meta) if meta else None)


def train_loader(data: FredData, cfg: FredConfig, stage: str, rank: int, world_size: int):
    """The training loader of a stage (its batch per process), seeded by (seed, epoch)."""
    batch = stage_batch(cfg, stage)
    try:
        return build_loader(data.train, batch, train=True, num_workers=cfg.num_workers, seed=cfg.seed, rank=rank,
                            world_size=world_size)
    except ValueError as error:
        raise FredDataError(f"{error}: the train split has {len(data.train)} {cfg.modality} samples but the "
                            f"{stage} stage needs a global batch of {batch * world_size}; lower "
                            f"--{stage}-batch-size or add data") from error


def eval_loader(dataset: FredDataset, cfg: FredConfig):
    """A sequential loader for validation or mAP (main process only)."""
    return build_loader(dataset, cfg.eval_batch_size, train=False, num_workers=cfg.num_workers, seed=cfg.seed)
