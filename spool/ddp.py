"""Training one head in several processes (``torchrun ... -m spool train-head``).

Every process holds the whole model and takes one contiguous share of every global batch
(``share``): the batch order, the number of steps and the learning-rate schedule are those
of one process with the same ``--batch-size``. DistributedDataParallel averages the
gradients; BatchNorm statistics are those of the global batch (``SyncedBatchNorm``); ``Ranks``
carries the few other collectives the training loop needs and is the identity for a
process alone, so ``spool.train`` has one code path.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from spool.distributed import Shard, TorchrunEnv


def share(n: int, shard: Shard) -> slice:
    """The contiguous part of ``n`` items that ``shard`` takes: sizes differ by at most one,
    the first ``n % count`` shards take one more, shards past ``n`` get an empty slice."""
    q, r = divmod(n, shard.count)
    start = shard.index * q + min(shard.index, r)
    return slice(start, start + q + (shard.index < r))


@dataclass(frozen=True)
class Ranks:
    """The processes of one torchrun job, seen from one of them (the ranks training one model,
    or extracting one store). ``Ranks()`` is a process alone: every collective is then the
    identity, so the training loop has one path."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes the outputs and prints."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over the ranks, a new tensor, the same on every rank (no autograd)."""
        if self.world_size == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank got here."""
        if self.world_size > 1:
            dist.barrier()

    def per_host(self) -> int:
        """How many of the ranks run on this machine (each holds its own copy of the features)."""
        if self.world_size == 1:
            return 1
        return self.gather(socket.gethostname()).count(socket.gethostname())


# How long a collective waits for the slowest rank. NCCL's default is 10 minutes, less than one
# rank may spend loading a large feature cache (or a shard creating its store) while the others
# already wait at the next collective.
TIMEOUT = datetime.timedelta(hours=2)


@contextmanager
def process_group(env: TorchrunEnv, device: torch.device) -> Iterator[Ranks]:
    """Join the run's processes for the block: NCCL on CUDA, gloo on the CPU. The rendezvous
    address is torchrun's (``init_method="env://"``). A group the caller already started is
    used as it is and left running."""
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise ValueError(
                f"a process group of {dist.get_world_size()} processes (this one rank {dist.get_rank()}) is running, "
                f"but this run asks for rank {env.rank} of {env.world_size}"
            )
        yield Ranks(env.rank, env.world_size)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives (gather, broadcast) use the current device
        dist.init_process_group("nccl", rank=env.rank, world_size=env.world_size, device_id=device, timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=TIMEOUT)
    try:
        yield Ranks(env.rank, env.world_size)
    finally:
        dist.destroy_process_group()


class _AllSum(torch.autograd.Function):
    """Sum over the ranks with a gradient: every rank's output is the same sum, so the gradient
    of every rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch split across the ranks: in training the same output,
    gradients and running statistics as ``nn.BatchNorm*d`` on the whole batch in one process.

    ``torch.nn.SyncBatchNorm`` does this on GPUs only (torch 2.14 refuses CPU tensors), so
    this one serves both. Statistics are two-pass (sum, then the sum of squares about the
    global mean) in float64, the count travels with the sum, and a rank with an empty share
    still takes part in both all-reduces. Same parameters and buffers as the BatchNorm it
    replaces (``sync_batchnorm``), so state dicts load into either. In eval mode it is a plain
    BatchNorm on the running statistics.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]  # every dimension but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = xf.numel() // max(1, xf.shape[1])
        stats = _AllSum.apply(torch.cat([xf.sum(dims).double(), xf.new_full((1,), local, dtype=torch.float64)]))
        count = int(stats[-1].item())
        if count < 2:
            raise ValueError(f"BatchNorm needs more than 1 value per channel when training, got {count} over all ranks")
        mean = (stats[:-1] / count).float()
        centered = xf - mean.view(shape)
        var = (_AllSum.apply(centered.square().sum(dims).double()) / count).float()  # biased, as BatchNorm normalises
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean, alpha=f)
                self.running_var.mul_(1 - f).add_(var * (count / (count - 1)), alpha=f)  # unbiased, as BatchNorm keeps
        return y.to(x.dtype)


def state_digest(module: nn.Module) -> str:
    """A hash of every parameter and buffer, bit for bit: equal on every rank after training."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm inside ``module`` by a SyncedBatchNorm that holds the same
    parameters and buffers (the same tensors: an optimizer built before stays valid). In place."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncedBatchNorm):
            synced = SyncedBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            if child.affine:
                synced.weight, synced.bias = child.weight, child.bias
            if child.track_running_stats:
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.num_batches_tracked = child.num_batches_tracked
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module
