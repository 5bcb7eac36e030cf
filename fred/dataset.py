"""FRED RGB+Event detection dataset, batch collation and loaders (spec/fred.md §5.5-5.8).

A sample is one index entry (:mod:`fred.index`) with the streams of the modality: ``rgb``, ``event`` or both
(``dual``). Training applies one synchronised augmentation draw per sample (:mod:`fred.augment`), evaluation the
letterbox only. Every dataset copy owns ``np.random.default_rng([seed, rank, epoch, worker_id])``: made by
:meth:`FredDataset.init_worker` in each loader worker (which also seeds ``random``), or by
:meth:`FredDataset.set_epoch` for worker 0 when the loader has no workers.

Typical use (trainer)::

    index = load_fred_index(root, fusion_threshold=0.1)
    target_fn = functools.partial(get_target, input_shape=(640, 640), num_classes=1)
    train_set = FredDataset(index.splits["train"], "dual", (640, 640), train=True, epoch_length=300, seed=11,
                            target_fn=target_fn)
    train_loader = build_loader(train_set, batch_size=8, train=True, num_workers=4, seed=11, rank=rank,
                                world_size=world_size)
    for epoch in ...:
        set_loader_epoch(train_loader, epoch)
        for batch in train_loader: ...   # batch["rgb"], batch["event"], batch["y_true"], ...
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.data import GlobalBatchSampler, WorkerSeeder
from fred.augment import compose, draw_augmentation, hsv_jitter, letterbox, letterbox_boxes, letterbox_geometry
from fred.index import FrameEntry, FredDataError, FredDataWarning, Sample, select_samples

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
        self.rank = 0
        self.epoch = 0
        self.worker_id = 0
        self.rng = self._make_rng(0)

    def __len__(self) -> int:
        return len(self.samples)

    # ---------------------------------------------------------------------------------------- seeding
    def _make_rng(self, worker_id: int) -> np.random.Generator:
        self.worker_id = worker_id
        return np.random.default_rng([self.seed, self.rank, self.epoch, worker_id])

    def set_rank(self, rank: int) -> None:
        """Set the process index (part of the RNG key)."""
        self.rank = rank
        self.rng = self._make_rng(self.worker_id)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (augmentation gate and RNG key); gives this copy the worker-0 RNG of the epoch."""
        self.epoch = epoch
        self.rng = self._make_rng(0)

    def init_worker(self, worker_id: int) -> None:
        """In a loader worker: the RNG of (seed, rank, epoch, worker_id), and ``random`` seeded from it."""
        self.rng = self._make_rng(worker_id)
        key = np.random.SeedSequence([self.seed, self.rank, self.epoch, worker_id]).generate_state(2)
        random.seed(int(key[0]) << 32 | int(key[1]))

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

    def draw(self, index: int):
        """The augmentation draw of sample ``index`` from this copy's RNG (advances it)."""
        sample = self.samples[index]
        partners = self._partners[(sample.use_rgb, sample.use_event)]
        return draw_augmentation(self.rng, index, partners, self.special_allowed, self.mosaic, self.mixup,
                                 self.jitter, self.hsv_gains or (0.0, 0.0, 0.0))

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        entry = sample.entry
        if self.train:
            draw = self.draw(index)
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
    "dataset too small"); evaluation: sequential, keeping the last batch. Workers are seeded by
    :class:`common.data.WorkerSeeder`, which calls ``dataset.init_worker``; ``persistent_workers`` is off so each
    epoch's workers see the epoch set by :func:`set_loader_epoch`.
    """
    dataset.set_rank(rank)
    sampler = GlobalBatchSampler(len(dataset), batch_size * world_size, seed=seed, rank=rank, world_size=world_size,
                                 shuffle=train, drop_last=train)
    seeder = WorkerSeeder(seed, rank)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      worker_init_fn=seeder if num_workers > 0 else None, persistent_workers=False)


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Before iterating an epoch: set the sampler's permutation (skipping ``start_batch`` batches when resuming),
    the dataset's epoch (RNG key, mosaic gate) and the workers' seeds."""
    loader.batch_sampler.set_epoch(epoch, start_batch)
    loader.dataset.set_epoch(epoch)
    if isinstance(loader.worker_init_fn, WorkerSeeder):
        loader.worker_init_fn.epoch = epoch
