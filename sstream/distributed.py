"""Data-parallel training on torch.distributed: the process group and the collectives it needs.

`torchrun --nproc_per_node=N -m sstream train ...` starts N processes (ranks) with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `DataParallel.from_env` joins them
into one process group (NCCL on CUDA, gloo on CPU). Without WORLD_SIZE (or with 1) there is
no process group and every method below is a no-op, so single-process training is untouched.

Why not `DistributedDataParallel`: `StreamingCNN` runs its backward tile by tile inside a
custom autograd Function, outside the forward DDP's reducer hooks into. Instead, the
training loop sums gradients explicitly, once per optimizer step:

    global group of G = N x accumulate images (the last group of an epoch may be smaller)
      rank r streams images r, r + N, r + 2N, ... of the group, loss / |group| each
      -> .grad on rank r = sum over its images of grad(loss) / |group|
      -> all-reduce SUM over ranks = sum over the whole group of grad(loss) / |group|
    which is exactly what one process with accumulate = N x A computes.

Failures: a rank that raises inside an `agreement` block still joins the block's closing
collective with a failure flag, so every rank learns of it and stops with a message naming
the failed rank and its error, instead of waiting forever. A rank that hangs or dies is caught
by the process group's timeout (`--dist-timeout`), reported as a `RankFailure`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sstream.errors import SstreamError, first_line
from sstream.runtime import resolve_device

DEFAULT_TIMEOUT_S = 600.0
BUCKET_ELEMENTS = 2**24  # gradients are all-reduced in flat buckets of at most this many
T = TypeVar("T")


class RankFailure(SstreamError, RuntimeError):
    """Another rank failed or stopped answering; the whole job stops."""


class DataParallel:
    """This process's place in a data-parallel job, and the collectives the training loop uses.

    Attributes:
        rank: this process's index, 0 .. world_size - 1 (0 writes every output).
        world_size: number of processes; 1 means no process group at all.
        device: where collective tensors live (the rank's CUDA device for NCCL, else CPU).
        timeout_s: how long a collective waits for the other ranks.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, owns_group: bool = False) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.timeout_s, self.owns_group = timeout_s, owns_group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S
                 ) -> tuple[DataParallel, torch.device]:
        """Join the process group torchrun describes in the environment, if there is one.

        Returns (this rank's DataParallel, the compute device). `device_name` is as for
        `resolve_device`; "auto"/"cuda" on a multi-GPU node mean cuda:LOCAL_RANK. A process
        group initialised by the caller beforehand is used as it is (and not destroyed).

        Raises:
            ValueError: a bad device name, or CUDA asked for without a GPU.
            RankFailure: the other ranks did not join within `timeout_s`.
        """
        device = resolve_device(device_name)
        if dist.is_available() and dist.is_initialized():
            world, owns = dist.get_world_size(), False
        else:
            world, owns = int(os.environ.get("WORLD_SIZE", "1")), True
        if world <= 1:
            return cls(), device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if owns:
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            except Exception as exc:
                raise RankFailure(f"rank {os.environ.get('RANK', '?')}: could not join the "
                                  f"{world} training processes ({first_line(exc)})") from exc
        collective_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), collective_device, timeout_s,
                   owns), device

    def close(self) -> None:
        """Leave the process group (only if `from_env` created it)."""
        if self.distributed and self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ---- sharding -------------------------------------------------------------------------

    def shard(self, start: int, stop: int) -> range:
        """This rank's positions of [start, stop): start + rank, start + rank + N, ..."""
        return range(start + self.rank, stop, self.world_size)

    # ---- agreeing on failures ---------------------------------------------------------------

    def _collective(self, where: str, call: Callable[[], T]) -> T:
        """Run one collective; a timeout or a vanished peer becomes a clear RankFailure."""
        try:
            return call()
        except Exception as exc:
            raise RankFailure(
                f"rank {self.rank}: {where}: the other training processes did not answer "
                f"within {self.timeout_s:g} s or one of them died ({first_line(exc)}); see "
                "their errors; --dist-timeout sets how long to wait") from exc

    def check(self, error: BaseException | None, where: str) -> None:
        """Every rank says whether it failed; raise on all ranks if any did.

        The failed rank re-raises its own `error`; the others raise RankFailure naming the
        failed ranks and their first error message.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        failed = torch.zeros(self.world_size, device=self.device)
        failed[self.rank] = float(error is not None)
        self._collective(where, lambda: dist.all_reduce(failed))
        if not failed.any():
            return
        messages = self.gather_objects(None if error is None else first_line(error), where)
        if error is not None:
            raise error
        ranks = [r for r, message in enumerate(messages) if message is not None]
        raise RankFailure(f"rank {ranks[0]} failed {where}: {messages[ranks[0]]}"
                          + (f" (and ranks {', '.join(map(str, ranks[1:]))})"
                             if len(ranks) > 1 else "") + "; all ranks stopped")

    @contextmanager
    def agreement(self, where: str) -> Iterator[None]:
        """A block every rank finishes together: an exception in one raises on all."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except RankFailure:
            raise   # the group itself is broken: no collective can tell the others
        except Exception as exc:
            self.check(exc, where)
            raise
        self.check(None, where)

    # ---- collectives --------------------------------------------------------------------

    def sum_values(self, values: Sequence[float], where: str) -> list[float]:
        """Element-wise sum over ranks of a few numbers (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        totals = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self._collective(where, lambda: dist.all_reduce(totals))
        return totals.tolist()

    def sum_gradients(self, params: Sequence[nn.Parameter], where: str) -> None:
        """All-reduce SUM the `.grad` of `params`, in flat buckets.

        A parameter with a gradient on some ranks gets zeros on the others first (so every
        rank sends the same buckets); one without a gradient on any rank keeps `.grad = None`
        (so the optimizer skips it, as one process would).
        """
        if not self.distributed:
            return
        has_grad = torch.tensor([float(p.grad is not None) for p in params],
                                dtype=torch.float64, device=self.device)
        self._collective(where, lambda: dist.all_reduce(has_grad))
        live = [p for p, count in zip(params, has_grad.tolist()) if count > 0]
        for param in live:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        for bucket in _buckets([p.grad for p in live]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self._collective(where, lambda flat=flat: dist.all_reduce(flat))
            _unflatten_into(flat, bucket)

    def broadcast_module(self, module: nn.Module, where: str = "copying the model") -> None:
        """Copy rank 0's parameters and buffers to every rank, in place."""
        if not self.distributed:
            return
        tensors = [t for t in [*module.parameters(), *module.buffers()]]
        with torch.no_grad():
            for bucket in _buckets(tensors):
                flat = torch.cat([t.detach().reshape(-1) for t in bucket]).to(self.device)
                self._collective(where, lambda flat=flat: dist.broadcast(flat, 0))
                _unflatten_into(flat, bucket)

    def broadcast_object(self, value: Any, where: str) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        self._collective(where, lambda: dist.broadcast_object_list(box, 0,
                                                                   device=self.device))
        return box[0]

    def gather_objects(self, value: Any, where: str = "gathering results") -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        self._collective(where, lambda: dist.all_gather_object(values, value))
        return values


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of tensors with one dtype and device, up to BUCKET_ELEMENTS each."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and (size + tensor.numel() > BUCKET_ELEMENTS
                       or (tensor.dtype, tensor.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


