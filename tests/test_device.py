import pytest
import torch

from spool.device import resolve_device


def test_auto_picks_what_exists_and_cuda_without_cuda_is_an_error():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_a_device_torch_cannot_read_names_the_option():
    from spool.distributed import TorchrunEnv, rank_device

    with pytest.raises(ValueError, match=r"--device 'gpu0' is not a device; pass auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")  # was torch's RuntimeError, a traceback from the command line
    env = TorchrunEnv(rank=0, world_size=2, local_rank=0)
    with pytest.raises(ValueError, match="--device 'gpu0' is not a device"):
        rank_device("gpu0", env)
