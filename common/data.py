"""Data-order helpers shared by the trainers: a seeded global-batch sampler and seeded data-loader workers.

The order of an epoch depends only on (seed, epoch): the same global batches are formed for any number of
processes, and a resumed run can start at any batch of an epoch. Each process takes its contiguous slice of
every global batch. With ``keyed=True`` the sampler hands the dataset a :class:`SampleKey` (index, epoch,
position in the epoch's order) instead of a bare index, so per-sample random draws can be seeded by the
sample's place in the epoch: identical for any number of processes and loader workers, and exact when a run
resumes in the middle of an epoch.

:func:`epoch_batches` drives a loader from a :class:`common.state.LoopPosition`, epoch after epoch, starting
at the position's batch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from common.checkpoint import DIRECTORY_MODE
from common.errors import DataError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(num_samples)`` used in ``epoch`` (depends only on seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class SampleKey(NamedTuple):
    """A sample's index and its place in an epoch's global order (what keyed datasets seed their draws with)."""

    index: int
    epoch: int
    position: int


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's slice of each global batch of a seeded per-epoch permutation.

    Args:
        num_samples: dataset length.
        global_batch: samples per optimizer micro-step over all processes (divisible by ``world_size``).
        seed: data-order seed.
        rank, world_size: this process and the number of processes.
        shuffle: permute per epoch (else sequential order).
        drop_last: drop the last incomplete global batch.
        keyed: yield :class:`SampleKey` tuples instead of indices.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, keyed: bool = False):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if drop_last and num_samples < global_batch:
            raise ValueError(f"dataset too small: {num_samples} samples for a global batch of {global_batch}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.keyed = keyed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_batch`` global batches (for resuming)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self) -> list[np.ndarray]:
        """All global batches of the current epoch (before skipping)."""
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        else:
            order = np.arange(self.num_samples)
        count = self.num_samples // self.global_batch if self.drop_last else -(-self.num_samples // self.global_batch)
        return [order[i * self.global_batch:(i + 1) * self.global_batch] for i in range(count)]

    def __len__(self) -> int:
        full = self.num_samples // self.global_batch
        count = full if self.drop_last else -(-self.num_samples // self.global_batch)
        return max(count - self.start_batch, 0)

    def __iter__(self) -> Iterator[list]:
        per_rank = self.global_batch // self.world_size
        for number, batch in enumerate(self.global_batches()[self.start_batch:], start=self.start_batch):
            share = -(-len(batch) // self.world_size) if len(batch) < self.global_batch else per_rank
            first = self.rank * share
            indices = batch[first:first + share].tolist()
            if self.keyed:
                start = number * self.global_batch + first
                yield [SampleKey(index, self.epoch, start + offset) for offset, index in enumerate(indices)]
            else:
                yield indices


class WorkerSeeder:
    """``worker_init_fn`` seeding every data-loader worker from (seed, rank, epoch, worker id).

    Set :attr:`epoch` before creating each epoch's iterator (workers are started per epoch, so they see it).
    If the dataset has ``init_worker(worker_id)``, it is called in the worker so datasets that own an RNG can
    derive it; with 0 workers call :meth:`seed_main_process` instead.
    """

    def __init__(self, seed: int, rank: int = 0):
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def seeds(self, worker_id: int) -> list[int]:
        """The entropy words for this worker."""
        return [self.seed, self.rank, self.epoch, worker_id]

    def _seed(self, worker_id: int) -> None:
        words = self.seeds(worker_id)
        seed32 = int(np.random.SeedSequence(words).generate_state(1)[0])
        random.seed(seed32)
        np.random.seed(seed32)
        torch.manual_seed(seed32)

    def __call__(self, worker_id: int) -> None:
        self._seed(worker_id)
        info = torch.utils.data.get_worker_info()
        dataset = info.dataset if info is not None else None
        if dataset is not None and hasattr(dataset, "init_worker"):
            dataset.init_worker(worker_id)

    def seed_main_process(self, dataset=None) -> None:
        """With ``num_workers=0``: give the dataset its worker-0 RNG for this epoch (global RNGs untouched)."""
        if dataset is not None and hasattr(dataset, "init_worker"):
            dataset.init_worker(0)


def set_loader_epoch(loader, epoch: int, start_batch: int = 0) -> None:
    """Before iterating an epoch: the sampler's permutation (skipping ``start_batch`` batches when resuming), the
    dataset's epoch (``set_epoch`` if it has one) and the workers' seeds (:class:`WorkerSeeder`)."""
    loader.batch_sampler.set_epoch(epoch, start_batch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if isinstance(loader.worker_init_fn, WorkerSeeder):
        loader.worker_init_fn.epoch = epoch


def epoch_batches(loader, position):
    """Yield ``loader``'s batches epoch after epoch from ``position`` (a :class:`common.state.LoopPosition`):
    each epoch starts at ``position.batch`` of ``position.epoch`` as the loop has advanced it
    (:meth:`~common.state.LoopPosition.next_batch`). Endless: the loop decides when to stop."""
    while True:
        set_loader_epoch(loader, position.epoch, position.batch)
        # A new iterator draws its workers' base seed from torch's global RNG (the workers are seeded by
        # WorkerSeeder instead); a resumed run creates one more iterator than an uninterrupted one, so the draw
        # must not move the RNG state that checkpoints save.
        rng = torch.get_rng_state()
        batches = iter(loader)
        torch.set_rng_state(rng)
        yield from batches


def to_device(batch, device: torch.device, non_blocking: bool = True):
    """Move tensors in a (nested) batch to ``device``; other values are returned unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device, non_blocking) for value in batch)
    return batch


def generate_folder(root: str | Path, write, ready) -> Path:
    """Generate a folder (a demo dataset) so that no reader ever sees it half-written.

    ``write(target)`` fills a fresh folder beside ``root`` which is then renamed to ``root``: an interrupted
    generation leaves at most a hidden ``.{name}.partial-*`` sibling (a killed process cannot delete it), never a
    ``root`` that looks complete. An existing ``root`` (outdated or incomplete; the caller has checked that it is
    its own) is replaced. Of several processes generating at once, the first to finish wins; the others accept its
    result when ``ready()`` says it is the one they wanted.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    target = staging / "data"
    try:
        write(target)
        os.chmod(target, DIRECTORY_MODE)  # for everyone, like every output of the kit
        if root.exists():  # outdated: moved into the staging folder, deleted below with it
            os.replace(root, staging / "outdated")
        try:
            os.replace(target, root)
        except OSError:
            if not ready():  # not a concurrent generator that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


class GeneratedDataset:
    """A generated dataset (a demo's): its folder holds the files and, written last, a JSON manifest naming the
    generator, its version and the seed. ``ensure(root, seed)`` returns a complete folder, generating it when absent
    or incomplete (:func:`generate_folder`), and refuses a folder that holds anything else.

    Args:
        generator: the manifest's ``generator`` value (the module that writes it).
        manifest_name: the manifest's file name.
        version: the generator version; another version's folder is refused, not overwritten.
        files: the relative file names a complete folder holds.
        write: ``write(folder, seed)`` writes every file, then the manifest.
        description: what it is, for messages ("colorization demo dataset").
    """

    def __init__(self, generator: str, manifest_name: str, version: int, files, write, description: str):
        self.generator, self.manifest_name, self.version = generator, manifest_name, version
        self.files, self.write, self.description = files, write, description

    def write_manifest(self, folder: Path, seed: int, digests: Mapping[str, str]) -> None:
        """Write the manifest (last: a folder without it is never taken as complete)."""
        manifest = {"generator": self.generator, "version": self.version, "seed": seed, "files": dict(digests)}
        (Path(folder) / self.manifest_name).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def manifest(self, root) -> dict | None:
        """The folder's manifest if this generator wrote it, else None."""
        try:
            manifest = json.loads((Path(root) / self.manifest_name).read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("generator") == self.generator else None

    def is_complete(self, root, seed: int) -> bool:
        """Whether ``root`` holds every file of this generator version and seed."""
        manifest = self.manifest(root)
        return (manifest is not None and manifest.get("seed") == seed and manifest.get("version") == self.version
                and all((Path(root) / name).is_file() for name in self.files()))

    def ensure(self, root: str | Path, seed: int = 0) -> Path:
        """``root`` holding the dataset for ``seed``, generated first if absent or incomplete.

        Raises:
            DataError: ``root`` holds other files, or the dataset of another seed or generator version.
        """
        root = Path(root)
        if self.is_complete(root, seed):
            return root
        manifest = self.manifest(root)
        if manifest is not None and (manifest.get("seed") != seed or manifest.get("version") != self.version):
            raise DataError(f"{root} holds the {self.description} for seed {manifest.get('seed')} (generator version "
                            f"{manifest.get('version')}); choose another folder for seed {seed} or delete it")
        if manifest is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise DataError(f"{root} exists and is not a demo dataset folder (expected the {self.description}); "
                            "choose an empty or new folder")
        return generate_folder(root, lambda target: self.write(target, seed), lambda: self.is_complete(root, seed))
