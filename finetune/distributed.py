"""Data-parallel training (torch DDP) for the one fine-tuning loop: a small context object, no second loop.

`DistContext` describes this process's place in a process group (rank, world size, device). The loop
(`finetune.loop.fit`) takes one and then: wraps the model in `DistributedDataParallel`, reduces its
metrics over the workers before any callback sees them, and hands rank 0 alone the writes
(`finetune.train.run_training`). Who creates the process group:

- Ray Train (`trainables.distributed`): `TorchTrainer` starts the workers and the group (NCCL on
  GPUs, gloo on CPUs); the worker calls `DistContext.from_initialized` with Ray's device.
- torchrun (`vitsweep train` under ``torchrun --nproc-per-node N``): `DistContext.from_env` reads
  RANK / WORLD_SIZE / LOCAL_RANK and calls `init_process_group` (nccl on CUDA, gloo on CPU).

The batch: ``batch_size`` is the *global* batch; each worker loads ``batch_size / world_size`` (refused
when not divisible), from `DistributedEpochSampler`, which splits the same per-epoch permutation the
single-process `EpochSampler` draws, so the global batches are the same samples whatever the worker
count. The learning rate is never rescaled: the global batch, hence the optimisation, does not change.
Nothing here imports Ray.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.utils.data import Sampler

from .errors import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistContext:
    """This process in a process group of `world_size` (already initialised)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    memory_per_rank: List[Dict[str, float]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_initialized(cls, device: torch.device) -> "DistContext":
        """The context of a process group someone else started (Ray Train's TorchTrainer)."""
        if not tdist.is_initialized():
            raise RuntimeError("DistContext.from_initialized: no torch.distributed process group")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(tdist.get_rank(), tdist.get_world_size(), local, torch.device(device))

    @classmethod
    def from_env(cls, device_name: str = "auto") -> Optional["DistContext"]:
        """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set, WORLD_SIZE > 1): start the process group
        (nccl on CUDA, gloo on CPU) and return this process's context; otherwise None."""
        if not all(k in os.environ for k in TORCHRUN_VARS):
            return None
        world = _env_int("WORLD_SIZE")
        if world <= 1:
            return None
        rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if device_name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={device_name!r} under torchrun but CUDA is not available here; use --device cpu")
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                                  "lower --nproc-per-node")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=_dt.timedelta(minutes=30))
        return cls(rank, world, local, device)

    # -------------------------------------------------------------- the loop's uses
    def local_batch_size(self, batch_size: int) -> int:
        """The per-worker batch of a global `batch_size` (refused when it does not divide)."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"batch_size={batch_size} is the global batch and must be divisible by the {self.world_size} "
                f"workers (each loads batch_size / workers); allowed: a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` in DDP (gradients averaged over workers in backward). `find_unused_parameters` stays
        off: every built-in variant uses all of its parameters in each forward (DDP names any that
        does not); VITSWEEP_DDP_FIND_UNUSED=1 turns it on for a plug-in that needs it."""
        find_unused = os.environ.get("VITSWEEP_DDP_FIND_UNUSED", "0") == "1"
        ids = [self.device.index if self.device.index is not None else 0] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce `tensor` in place (sum over workers); returns it."""
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def sum_floats(self, values: Sequence[float]) -> List[float]:
        """Each value summed over the workers (float64 on the group's device)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        return self.sum_(t).tolist()

    def max_float(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: Any) -> List[Any]:
        """`obj` of every rank, in rank order (small objects: memory figures)."""
        out: List[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def reduce_memory(self, memory: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
        """The epoch's memory figures, the maximum over workers under the usual names. Each rank's peak
        over the run so far is kept in `memory_per_rank` (rank order; run/result.json records it)."""
        ranks = self.gather(dict(memory))
        if not self.memory_per_rank:
            self.memory_per_rank = [{} for _ in ranks]
        merged: Dict[str, Optional[float]] = {}
        for key in memory:
            values = [r.get(key) for r in ranks if r.get(key) is not None]
            merged[key] = max(values) if values else None
        for peak, figures in zip(self.memory_per_rank, ranks):
            for key, value in figures.items():
                if value is not None:
                    peak[key] = max(value, peak.get(key, value))
        return merged

    def barrier(self) -> None:
        tdist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")

    def describe(self) -> Dict[str, Any]:
        """What run/result.json records under ``environment``."""
        return {"world_size": self.world_size, "backend": tdist.get_backend(), "memory_per_rank": self.memory_per_rank}


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} (set by torchrun) must be an integer") from None


class DistributedEpochSampler(Sampler[int]):
    """Rank `rank`'s share of `EpochSampler`'s per-epoch permutation: the same permutation (from
    ``seed + epoch``), cut to a multiple of `world_size` and strided (``perm[rank::world_size]``, as
    `torch.utils.data.DistributedSampler` does). With a per-worker batch of ``B / world_size``, the
    union of the workers' i-th batches is the single-process run's i-th batch of ``B``."""

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_samples, generator=generator)[: len(self) * self.world_size]
        return iter(perm[self.rank:: self.world_size].tolist())


class ShardSampler(Sampler[int]):
    """Evaluation: rank `rank` takes ``range(num_samples)[rank::world_size]``; every sample is seen
    once over all workers (counts may differ by one), and the loop sums the counts."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
