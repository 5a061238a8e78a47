"""Batching: the epoch's training batches (seeded, split across processes), the test batches (whole batches
shared out between processes), and a collate for variable box counts that leaves out dropped samples.

Training: the epoch's order is a permutation drawn from (seed, epoch) only, so a resumed run sees the
same batches. Global batches of ``batch_size`` images are cut from it and each process takes its equal,
contiguous part. A short last batch is kept as it is in a single process (as the reference's reader);
with several processes, or when it holds a single image (batch norm needs two), it is completed with
images from the start of that epoch's order, so no image is left out and every process gets its share.

Evaluation: batches of ``batch_size`` in data-set order, batch ``j`` on process ``j % world_size``: every image
exactly once, and the batches (whose composition moves the mAP of the dynamic ``abs_max`` model) are
those of a single process.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class Batch(NamedTuple):
    images: torch.Tensor        # [N, 3, H, W]
    boxes: list                 # per image [K, 4]
    labels: list                # per image [K]
    difficult: list             # per image [K]
    indices: list[int]          # data-set index of each image
    dropped: int                # samples left out (their crop kept no box)


class TrainBatches(Sampler):
    """This process's part of every global training batch of an epoch (see the module docstring)."""

    def __init__(self, length: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if length < 1:
            raise ValueError("no training images")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} processes")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.length) if self.shuffle
                 else np.arange(self.length))
        batches = [order[i:i + self.batch_size] for i in range(0, self.length, self.batch_size)]
        short = self.batch_size - len(batches[-1])
        if short and (self.world_size > 1 or len(batches[-1]) < 2):
            batches[-1] = np.concatenate([batches[-1], np.resize(order, short)])
        return batches

    def __iter__(self):
        share = len(self.global_batches()[0]) // self.world_size if self.world_size > 1 else None
        for batch in self.global_batches():
            if share is None:
                yield batch.tolist()
            else:
                yield batch[self.rank * share:(self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return -(-self.length // self.batch_size)


class EvalBatches(Sampler):
    """Batches of ``batch_size`` in order; batch ``j`` belongs to process ``j % world_size``."""

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for j, start in enumerate(range(0, self.length, self.batch_size)):
            if j % self.world_size == self.rank:
                yield list(range(start, min(start + self.batch_size, self.length)))

    def __len__(self) -> int:
        batches = -(-self.length // self.batch_size)
        return len(range(self.rank, batches, self.world_size))


class Collate:
    """Stack a batch of ``Sample``s. Dropped samples are left out, except as many as it takes to keep
    ``min_images`` (batch norm cannot train on a single image: the last feature map is 1x1); those keep
    the whole (uncropped) image the transform put in their place."""

    def __init__(self, min_images: int = 1):
        self.min_images = min_images

    def __call__(self, samples) -> Batch:
        missing = min(self.min_images, len(samples)) - sum(not s.dropped for s in samples)
        spares = {id(s) for s in [s for s in samples if s.dropped][:max(0, missing)]}
        kept = [s for s in samples if not s.dropped or id(s) in spares]
        return Batch(torch.stack([s.image for s in kept]), [s.boxes for s in kept], [s.labels for s in kept],
                     [s.difficult for s in kept], [s.index for s in kept], len(samples) - len(kept))


def train_loader(dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0) -> DataLoader:
    """Training batches; ``batch_size`` counts all processes together."""
    return DataLoader(dataset, batch_sampler=TrainBatches(len(dataset), batch_size, seed, rank, world_size),
                      num_workers=num_workers, collate_fn=Collate(min_images=2))


def eval_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_sampler=EvalBatches(len(dataset), batch_size, rank, world_size),
                      num_workers=num_workers, collate_fn=Collate())


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the epoch's order and augmentation (both seeded), before iterating the loader."""
    loader.batch_sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
