"""Several processes training one stage: data-parallel ranks over the tasks of one submitit job.

A stage whose resources ask for more than one task (``tasks`` per node, default ``gpus``, times
``nodes``) runs as that many tasks of one scheduler job. Each task joins ``torch.distributed`` from
submitit's job environment (NCCL on GPUs, gloo on CPUs) and becomes one rank. Every rank builds
the same global batch from the epoch's pure (seed, epoch) order and augmentation, and trains on
its contiguous share of it (``Ranks.shard``), so the global batch size is the sweep's and the
images are the one-process run's. After backward the gradients are summed over ranks in one flat
all-reduce, each rank's loss having been weighted by its share of the batch: the step is the
one-process step on the whole batch, BatchNorm aside. BatchNorm layers are synchronised
(``sync_batchnorm``): torch's ``SyncBatchNorm`` on GPUs, and on CPUs, where torch has none, a
BatchNorm whose batch statistics are all-reduced with autograd (``_AllReducedBatchNorm``), so that
two CPU ranks give the one-process losses up to float rounding.

The all-reduce after backward instead of a ``DistributedDataParallel`` wrapper: the loop trains a
student and its method's modules through forward hooks, which a wrapper would hide; the arithmetic
is DDP's (mean gradient over ranks), without overlapping communication with backward.

Only rank 0 writes: the lease, checkpoints, logs, weights and DONE. The others read the same
checkpoint on a requeue, so a multi-rank job resumes like a single one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


# torch 2.14 marks the autograd-aware all_reduce deprecated; its named successor in
# _functional_collectives is private. Keep the public one, without a warning per rank.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated", category=FutureWarning)


RANK_TIMEOUT = timedelta(minutes=20)
"""How long a rank waits in a collective: the others wait out rank 0's evaluation and checkpoint
each epoch, and a rank that died leaves the rest to fail after this instead of holding the job."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among a stage's ranks; ``Ranks()`` is the one-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Whether this rank writes the stage's files (rank 0)."""
        return self.rank == 0

    def shard(self, count: int) -> slice:
        """This rank's contiguous part of a global batch of ``count`` samples; parts differ by at most one."""
        return slice(count * self.rank // self.world, count * (self.rank + 1) // self.world)

    def sum_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Sums every gradient over the ranks in one flat all-reduce (a missing gradient counts as 0)."""
        if self.world == 1:
            return
        parameters = [parameter for parameter in parameters if parameter.requires_grad]
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        flat = torch.cat([parameter.grad.reshape(-1) for parameter in parameters])
        dist.all_reduce(flat)
        offset = 0
        for parameter in parameters:
            parameter.grad.copy_(flat[offset : offset + parameter.numel()].view_as(parameter.grad))
            offset += parameter.numel()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (a float64 or int64 tensor of the epoch's sums)."""
        if self.world > 1:
            dist.all_reduce(values)
        return values

    def agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (whether the stage runs here at all)."""
        if self.world == 1:
            return value
        holder = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(holder, src=0)
        return int(holder.item())


def join_ranks() -> Ranks:
    """This task's ranks: from submitit's environment inside a job of several tasks (initialising
    ``torch.distributed``, NCCL when the node has GPUs, else gloo), else the one-process ``Ranks()``."""
    try:
        import submitit

        environment = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job: a local ``runner.py stage`` call
        return Ranks()
    if environment.num_tasks == 1:
        return Ranks()
    if not dist.is_initialized():
        from submitit.helpers import TorchDistributedEnvironment

        distributed = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=distributed.rank, world_size=distributed.world_size,
                                timeout=RANK_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), environment.local_rank)


def leave_ranks(ranks: Ranks, finished: bool) -> None:
    """Ends the process group: after a barrier when the stage finished here, at once after an error
    (the other ranks, stuck in a collective, fail at ``RANK_TIMEOUT`` and the job ends)."""
    if ranks.world > 1 and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class _AllReducedBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the whole global batch's: per-channel count, sum
    and sum of squares all-reduced with autograd (``torch.distributed.nn``), so the gradient flows
    through the other ranks' statistics as it would through one process's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
        sums = torch.cat([input.sum(dim=(0, 2, 3)), (input * input).sum(dim=(0, 2, 3)), count])
        sums = all_reduce(sums)
        channels = input.shape[1]
        total = sums[-1]
        mean = sums[:channels] / total
        variance = sums[channels : 2 * channels] / total - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = variance * total / (total - 1).clamp(min=1)
            self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        scale = torch.rsqrt(variance + self.eps)
        output = (input - mean[None, :, None, None]) * scale[None, :, None, None]
        return output * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else output


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm2d synchronised over the ranks. On a CPU each layer only changes
    class, keeping its parameter and buffer objects, so the optimiser, taps and state-dict keys see
    the same tensors; torch's GPU conversion copies them into new SyncBatchNorm layers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for layer in module.modules():
        if type(layer) is nn.BatchNorm2d:
            layer.__class__ = _AllReducedBatchNorm
    return module
