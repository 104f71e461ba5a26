"""DataLoaders with a reproducible, re-seedable shuffle order."""

from __future__ import annotations

import random
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class EpochGenerator(torch.Generator):
    """A torch.Generator that remembers when `manual_seed` was last called (see `ReseedableSampler`)."""

    reseeded: bool = False

    def manual_seed(self, seed: int) -> "EpochGenerator":
        self.reseeded = True
        return super().manual_seed(seed)


class ReseedableSampler(Sampler[int]):
    """Random permutations whose order after `generator.manual_seed(s)` depends on s alone.

    DataLoader also draws its workers' base seed from the same generator, but only when it creates
    an iterator, which persistent workers do once: drawing the permutation straight from the
    generator would make the first epoch after a reseed differ from later ones (and a resumed run
    differ from an uninterrupted one). So each reseed restarts a private generator at
    `generator.initial_seed()`; without a reseed, epochs continue its stream.
    """

    def __init__(self, num_samples: int, generator: EpochGenerator) -> None:
        self.num_samples = num_samples
        self.generator = generator
        self._stream = torch.Generator()
        self._stream.manual_seed(generator.initial_seed())

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.generator.reseeded:
            self._stream.manual_seed(self.generator.initial_seed())
            self.generator.reseeded = False
        return iter(torch.randperm(self.num_samples, generator=self._stream).tolist())


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a worker from torch's per-worker seed (base_seed + worker_id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(
    bundle,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    seed: int,
    eval_batch_size: Optional[int] = None,
) -> Tuple[DataLoader, DataLoader]:
    """(train, val) loaders for a DataBundle.

    The train loader shuffles with a sampler tied to its own generator (`loader.generator`): calling
    `loader.generator.manual_seed(seed * 100003 + epoch)` before an epoch fixes that epoch's order,
    whatever happened before. It drops the last partial batch only when the dataset holds at least
    one full batch. Workers (num_workers > 0) are persistent and seed numpy/random from torch.
    """
    generator = EpochGenerator()
    generator.manual_seed(seed)
    common = dict(
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
    )
    train = DataLoader(
        bundle.train,
        batch_size=batch_size,
        sampler=ReseedableSampler(len(bundle.train), generator),
        generator=generator,
        drop_last=len(bundle.train) >= batch_size,
        **common,
    )
    val = DataLoader(bundle.val, batch_size=eval_batch_size or batch_size, shuffle=False, drop_last=False, **common)
    return train, val
