"""spool.ddp: how a batch is shared out, and SyncedBatchNorm against BatchNorm on the whole
batch, in two gloo processes."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.nn as nn

from spool.ddp import Ranks, SyncedBatchNorm, share, sync_batchnorm
from spool.distributed import Shard


def test_share_splits_a_batch_in_order():
    for n in range(0, 12):
        for count in range(1, 5):
            parts = [share(n, Shard(i, count)) for i in range(count)]
            sizes = [p.stop - p.start for p in parts]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (shape, where each rank's rows start and stop, affine, momentum): uneven rows, an empty
# rank (as a process with an empty share of a batch), and (N, C, L) input
BN_CASES = [((7, 4), (0, 4, 7), True, 0.1), ((6, 3), (0, 6, 6), False, 0.1), ((3, 4, 5), (0, 1, 3), True, None)]


def _bn_worker(rank: int, world: int, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same data and reference on both ranks
    for shape, cuts, affine, momentum in BN_CASES:
        ref = nn.BatchNorm1d(shape[1], affine=affine, momentum=momentum)
        if affine:
            nn.init.normal_(ref.weight), nn.init.normal_(ref.bias)
        synced = sync_batchnorm(nn.Sequential(copy.deepcopy(ref)))[0]
        assert isinstance(synced, SyncedBatchNorm) and synced.state_dict().keys() == ref.state_dict().keys()
        mine = slice(cuts[rank], cuts[rank + 1])
        for step in range(2):  # running statistics after two updates
            x = torch.randn(shape) * 3 + 5  # an offset, as frozen features have
            upstream = torch.randn(shape)  # the gradient of some loss with respect to the output
            full, part = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
            y_ref, y = ref(full), synced(part)
            (y_ref * upstream).sum().backward()
            (y * upstream[mine]).sum().backward()
            torch.testing.assert_close(y, y_ref[mine], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(part.grad, full.grad[mine], rtol=1e-5, atol=1e-5)
        if affine:  # each rank holds its share of the parameter gradients; DDP sums them
            for p_ref, p in ((ref.weight, synced.weight), (ref.bias, synced.bias)):
                torch.testing.assert_close(Ranks(rank, world).sum(p.grad), p_ref.grad, rtol=1e-5, atol=1e-5)
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(getattr(synced, name), buf, rtol=1e-5, atol=1e-6, msg=name)
        x = torch.randn(shape)
        torch.testing.assert_close(synced.eval()(x), ref.eval()(x))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_synced_batchnorm_equals_batchnorm_on_the_whole_batch():
    torch.multiprocessing.spawn(_bn_worker, args=(2, _free_port()), nprocs=2)
