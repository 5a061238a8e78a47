"""Batching for detection: a collate for variable box counts and an epoch-seeded (optionally sharded) sampler."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


def detection_collate(samples):
    """Images stacked into [N, 3, H, W]; boxes, labels and difficult flags kept as per-image lists."""
    images, boxes, labels, difficult = zip(*samples)
    return torch.stack(images), list(boxes), list(labels), list(difficult)


class EpochSampler(Sampler):
    """Order fixed by (seed, epoch); with ``world_size`` > 1 each rank takes every world_size-th index.

    The order depends on nothing but the seed and the epoch, so a resumed run sees the same batches.
    Shards are padded by wrapping around so every rank runs the same number of steps.
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.length)
        else:
            order = np.arange(self.length)
        per_rank = -(-self.length // self.world_size)
        padded = np.resize(order, per_rank * self.world_size) if self.length else order
        return padded[self.rank::self.world_size].tolist()

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return -(-self.length // self.world_size)


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False) -> DataLoader:
    sampler = EpochSampler(len(dataset), shuffle, seed, rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=detection_collate, drop_last=drop_last,
                      persistent_workers=False, pin_memory=False)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the epoch's order and augmentation (both seeded), before iterating the loader."""
    loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
