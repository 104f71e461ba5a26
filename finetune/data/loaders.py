"""DataLoaders with a reproducible shuffle order: the train sampler's `set_epoch(epoch)` fixes that
epoch's order from (seed, epoch) alone, as `torch.utils.data.DistributedSampler` does."""

from __future__ import annotations

import random
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

# Run seed -> sampler seed. The epoch is added to it, so the stride keeps runs with seeds s and s + 1
# from sharing orders (run s, epoch e + 1 == run s + 1, epoch e) for fewer than 100003 epochs.
SEED_STRIDE = 100003


class EpochSampler(Sampler[int]):
    """A random permutation of range(num_samples) per epoch, from
    `torch.Generator().manual_seed(seed + epoch)`. Call `set_epoch(epoch)` before each epoch; without
    it every pass repeats the same order. The order depends on (seed, epoch) alone, so a run resumed
    at epoch k sees the same batches as an uninterrupted one."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


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
    dist=None,
) -> Tuple[DataLoader, DataLoader]:
    """(train, val) loaders for a DataBundle.

    The train loader shuffles with an `EpochSampler`: `loader.sampler.set_epoch(epoch)` before an
    epoch fixes its order, whatever happened before. The train loader's own generator (seeded from
    `seed`) draws the workers' base seed, so torch's global RNG is not touched and worker seeds
    depend on `seed` alone. It drops the last partial batch only when the dataset holds at least one
    full batch. Workers (num_workers > 0) are persistent and seed numpy/random from torch.

    With `dist` (a `finetune.distributed.DistContext`), `batch_size` is the global batch: this worker
    loads ``batch_size / world_size`` per step from its share of the same permutation
    (`DistributedEpochSampler`) and its shard of the validation set (`ShardSampler`).
    """
    common = dict(
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
    )
    eval_batch_size = eval_batch_size or batch_size
    sampler: Sampler[int] = EpochSampler(len(bundle.train), seed * SEED_STRIDE)
    val_sampler = None
    if dist is not None:
        from ..distributed import DistributedEpochSampler, ShardSampler

        batch_size = dist.local_batch_size(batch_size)
        eval_batch_size = max(1, eval_batch_size // dist.world_size)
        sampler = DistributedEpochSampler(len(bundle.train), seed * SEED_STRIDE, dist.rank, dist.world_size)
        val_sampler = ShardSampler(len(bundle.val), dist.rank, dist.world_size)
    train = DataLoader(
        bundle.train,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed * SEED_STRIDE),
        drop_last=len(sampler) >= batch_size,
        **common,
    )
    val = DataLoader(bundle.val, batch_size=eval_batch_size, sampler=val_sampler, shuffle=False, drop_last=False,
                     **common)
    return train, val
