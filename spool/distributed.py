"""Which share of the work this process has: ``--shard i/n``, or the rank and world size that
torchrun gives it. Read once, by the command line, and passed down in the stage's config."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based index). ``Shard(0, 1)`` is the whole job."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {self.index}/{self.count}")

    @property
    def whole(self) -> bool:
        return self.count == 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"3/8"`` -> ``Shard(3, 8)``. Slurm job arrays number tasks from 0 or 1; Spool counts from 0."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4, shard 0 of 4), got {text!r}")
    return Shard(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The rank torchrun (or any launcher that sets RANK/WORLD_SIZE) gave this process, or None
    when it runs alone. Only the command line calls this: library code takes a config."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    world_size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    if world_size <= 1:
        return None
    return TorchrunEnv(rank=rank, world_size=world_size, local_rank=int(env.get("LOCAL_RANK", rank)))


def rank_device(device: str, env: TorchrunEnv):
    """The torch.device of one torchrun process: ``cuda:LOCAL_RANK`` for "cuda" (and for "auto"
    when CUDA is available), else the CPU. Errors name the option to change."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from spool.device import parse_device

    d = parse_device(device)
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise ValueError(f"--device {device}: under torchrun Spool runs on cpu or cuda; pass --device cuda, cpu or auto")
    if d.index is not None:
        raise ValueError(
            f"--device {device} under torchrun: each process uses the GPU cuda:LOCAL_RANK; pass --device cuda (or auto)"
        )
    if not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but CUDA is not available; use --device cpu or auto")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise ValueError(
            f"--device cuda under torchrun: the process with LOCAL_RANK {env.local_rank} needs GPU cuda:{env.local_rank}, "
            f"but this machine shows {count} GPU(s); set torchrun's --nproc-per-node to at most {count}"
        )
    return torch.device("cuda", env.local_rank)
