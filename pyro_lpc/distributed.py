r"""Data-parallel `fit` on `torch.distributed` (launched with `torchrun`).

Every process (rank) holds a full copy of the model and guide and trains on its
own shard of each *global* mini-batch of `world_size × batch_size` points:

* local latents: each rank runs the Langevin chains of its own data points,
  with no communication inside a chain;
* the shared diagonal preconditioner: its gradient statistics are averaged
  over ranks once per chain (when `P` is refreshed), so every rank samples
  with the same `P`;
* global latents: one chain, identical on every rank — its mini-batch gradient
  is averaged over ranks at every step and its noise comes from a generator
  seeded alike on every rank;
* θ and φ: their gradients are averaged over ranks (as
  `DistributedDataParallel` does) in one flat all-reduce per iteration, so
  every rank takes the same optimiser step.

Averaging is exactly the single-process gradient on the global batch when the
model scales its data plate by `N / B` (a subsampled plate); a model that
sums its mini-batch unscaled gets `1 / world_size` of it — the same
convention as `DistributedDataParallel` with a summed loss.

[`replicas`][pyro_lpc.distributed.replicas] returns a [`Replicas`][pyro_lpc.distributed.Replicas] for the
current process group, or a [`SingleProcess`][pyro_lpc.distributed.SingleProcess] with the same methods when
there is none.
"""
from __future__ import annotations

import datetime
import os
import random
import sys
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyro
import torch
import torch.distributed as dist

#: Bound on how long a collective waits for the other ranks before failing.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def init_from_env(backend: Optional[str] = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group that `torchrun` describes in the environment.

    Does nothing (and returns `False`) unless `WORLD_SIZE` > 1 is set and no
    group exists yet. `backend` defaults to NCCL when CUDA is available, else
    gloo. A collective that waits longer than `timeout` fails instead of hanging.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def finish(code: int = 0) -> None:
    """End a `torchrun` worker: leave the process group, flush, and exit with `code`
    without interpreter teardown. (Seen on this project's CI machine: a worker that had
    finished all its work aborted during teardown — "terminate called without an active
    exception", exit −6 — in 2 of about 40 launches, once after leaving the group.)
    Does nothing in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _seed_for(base: int, *key: int) -> int:
    """A 32-bit seed (NumPy takes no more) derived from `base` and `key` (independent streams per key)."""
    return int(np.random.SeedSequence([base, *key]).generate_state(1)[0])


class SingleProcess:
    """One process: every collective is the identity."""

    rank, world_size = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average(self, tensors: List[Optional[torch.Tensor]], like: Optional[List[torch.Tensor]] = None):
        """The mean over ranks of each tensor, in one all-reduce. `None` marks a tensor
        absent on this rank (shaped as the matching entry of `like`); it stays
        `None` only where it is absent on every rank."""
        return list(tensors)

    def average_dict(self, values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """`values` averaged over ranks, keys kept."""
        return dict(zip(values, self.average(list(values.values()))))

    def broadcast(self, tensors: List[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values."""

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        return obj

    def gather_objects(self, obj) -> List:
        """Every rank's `obj`, in rank order (on every rank)."""
        return [obj]

    def gather_rows(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """Each of `tensors` (the same number of rows on this rank, any number per rank)
        concatenated along dim 0 over ranks in rank order, on every rank."""
        return list(tensors)

    def check_same(self, what: str, value) -> None:
        """Raise on every rank if `value` differs between ranks."""

    def seed(self, seed: Optional[int]) -> int:
        """Seed this rank's RNGs and return the base seed. Rank 0 is seeded with
        `seed` itself, rank r with an independent stream derived from it. With
        `seed=None` a single process keeps its RNGs (the base is drawn from
        them); several ranks draw a base on rank 0 and seed from it."""
        if seed is None:
            if self.world_size == 1:
                return int(torch.randint(2**32, ()).item())
            seed = self.broadcast_object(random.SystemRandom().getrandbits(32))
        pyro.set_rng_seed(seed if self.rank == 0 else _seed_for(seed, self.rank))
        return seed

    def reseed(self, base: int, epoch: int) -> None:
        """Fresh per-rank streams for a run resumed at `epoch` under another world size."""
        pyro.set_rng_seed(_seed_for(base, epoch, self.rank))

    def streams(self, seed: Optional[int]) -> "tuple[int, torch.Generator]":
        """Seed this rank ([`seed`][pyro_lpc.distributed.SingleProcess.seed]) and return the base seed and a
        CPU generator in the same state on every rank, for what all ranks draw alike (the data order, the
        global chains' noise)."""
        base = self.seed(seed)
        return base, torch.Generator().manual_seed(_seed_for(base, 2**31))

    def shard(self, batches: Iterator, data, epoch: int) -> Iterator:
        """This rank's share of one epoch's `batches` (`(args, kwargs)` pairs).

        For a tensor `data` the batches are *global* (`world_size × batch_size`
        rows, in the same order on every rank) and each rank takes its contiguous
        share of the rows, and of the batch's `data_indices` when it has them (a
        final batch with fewer rows than ranks is dropped). A
        loader with a `DistributedSampler` is already sharded (its `set_epoch`
        is called). Any other iterable is dealt round-robin, batch `i` to rank
        `i mod world_size`, dropping an incomplete final round so that every
        rank takes the same number of steps.
        """
        if torch.is_tensor(data):
            for (batch,), kwargs in batches:
                if len(batch) >= self.world_size:
                    yield (batch.tensor_split(self.world_size)[self.rank],), \
                        {k: v.tensor_split(self.world_size)[self.rank] for k, v in kwargs.items()}
            return
        sampler = getattr(data, "sampler", None)
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)
            yield from batches
            return
        for i, batch in enumerate(batches):
            if i % self.world_size == self.rank:
                held = batch
            if i % self.world_size == self.world_size - 1:
                yield held

    def num_batches(self, data, batch_size) -> int:
        """Mini-batches per epoch on this rank, or 0 when `data` does not say."""
        if torch.is_tensor(data):
            if not batch_size:
                return 0
            global_batch = batch_size * self.world_size
            full, rest = divmod(data.shape[0], global_batch)
            return full + (rest >= self.world_size)
        try:
            n = len(data)
        except TypeError:
            return 0
        if isinstance(getattr(data, "sampler", None), torch.utils.data.DistributedSampler):
            return n
        return n // self.world_size


class Replicas(SingleProcess):
    """This process's place in the default `torch.distributed` group."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def average(self, tensors, like=None):
        filled = [t if t is not None else torch.zeros_like(like[i]) for i, t in enumerate(tensors)]
        flags = torch.tensor([float(t is not None) for t in tensors], device=self.device)
        flat = torch.cat([flags] + [t.detach().reshape(-1).to(self.device) for t in filled])
        dist.all_reduce(flat)
        out, offset = [], len(tensors)
        for t, flag in zip(filled, flat[: len(tensors)].tolist()):
            chunk = flat[offset:offset + t.numel()]
            offset += t.numel()
            out.append(None if flag == 0 else (chunk / self.world_size).reshape(t.shape).to(t.device, t.dtype))
        return out

    def broadcast(self, tensors):
        for t in tensors:
            buffer = t.detach().to(self.device)
            dist.broadcast(buffer, src=0)
            with torch.no_grad():
                t.copy_(buffer.to(t.device))

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, tensors):
        sizes = self.gather_objects(len(tensors[0]))
        out = []
        for t in tensors:  # padded to the most rows of any rank, as all_gather needs equal shapes
            padded = t.new_zeros((max(sizes),) + t.shape[1:], device=self.device)
            padded[:len(t)] = t.detach()
            gathered = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(gathered, padded)
            out.append(torch.cat([g[:n] for g, n in zip(gathered, sizes)]).to(t.device))
        return out

    def check_same(self, what, value):
        values = self.gather_objects(value)
        different = [r for r, v in enumerate(values) if v != values[0]]
        if different:
            raise RuntimeError(
                f"{what} differs between ranks: rank 0 has {values[0]!r}, rank {different[0]} has "
                f"{values[different[0]]!r}. Every rank must run the same model and guide."
            )


def replicas():
    """[`Replicas`][pyro_lpc.distributed.Replicas] when a `torch.distributed` group with more than one rank
    exists (joining the one `torchrun` describes, see [`init_from_env`][pyro_lpc.distributed.init_from_env]),
    else [`SingleProcess`][pyro_lpc.distributed.SingleProcess]."""
    init_from_env()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Replicas()
    return SingleProcess()

