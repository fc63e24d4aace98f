"""What a head costs: parameters, forward FLOPs per clip, and peak memory during a run.

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-accumulate of a
matrix product (linear layers, attention's Q K^T and A V); element-wise work (softmax,
norms, GELU, residual adds, means) is not counted. The head runs once, on one clip, on the
meta device: no memory, no time, and FlopCounterMode sees every matrix product there, SDPA
included (on the CPU it does not see the fused SDPA kernel and would count no attention).

Attention, per head (S = F*L tokens, hd = width / heads, H heads):

- ``full``: as FlopCounterMode counts SDPA without a mask: every query-key pair,
  4 * hd FLOPs per pair and head, 4 * hd * H * S^2 per block.
- ``factorized``: the same for its two SDPA calls: H * (F * L^2 + L * F^2) pairs per block.
- ``spool``: only the pairs the mask allows (``spool.mask.allowed_pairs``: H * S^2 times the
  mask's density), 4 * hd each, whichever backend runs: what the kernel has to compute.
  FlopCounterMode's count of the backend actually used (dense: all pairs; blocked: every
  slot of its gathered windows) is replaced by that. flex skips empty 128 x 128 blocks but
  computes partial ones whole, so its real work lies between this count and the dense one.
- ``attentive-probe``: FlopCounterMode's count (one query over T*L keys, SDPA).
- ``mean-linear``: its one linear layer.
"""

from __future__ import annotations

import dataclasses
import resource
import sys

import torch
import torch.nn as nn


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _core_attention(counts: dict, name: str) -> int:
    """FlopCounterMode's FLOPs inside attention module ``name`` less its linear layers: QK^T and AV."""
    total = sum(counts.get(name, {}).values())
    for child in ("qkv", "proj", "q", "kv"):
        total -= sum(counts.get(f"{name}.{child}", {}).values())
    return total


def forward_flops(head: str, head_config, *, num_frames: int, num_tokens: int) -> dict:
    """Forward FLOPs of one clip through ``head`` built from ``head_config`` (see the module
    docstring for the counting rule). Returns ``{"flops", "attention_flops", "attention_counted"}``:
    the total, the part spent in Q K^T and A V, and how that part was counted."""
    from spool.baselines import CrossAttention
    from spool.checkpoint import HEAD_INPUTS, build_head
    from spool.mask import allowed_pairs
    from spool.model import BidirectionalTemporalAttention, HeadConfig, SelfAttention

    masked = isinstance(head_config, HeadConfig) and head_config.attention == "spool"
    if masked:  # any backend builds on meta; its attention count is replaced below
        head_config = dataclasses.replace(head_config, backend="blocked")
    # fork_rng: building the model draws initial weights; the caller's random stream (its
    # dropout masks, its next model) must not depend on whether FLOPs were counted
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        model = build_head(head, head_config, device="meta").eval().requires_grad_(False)
    dim = getattr(head_config, "in_dim")
    shapes = {"patches": (1, num_frames, num_tokens, dim), "cls": (1, num_frames, dim)}
    inputs = [torch.zeros(shapes[i], device="meta") for i in HEAD_INPUTS[head]]
    from torch.utils.flop_counter import FlopCounterMode

    # requires_grad off rather than no_grad: FlopCounterMode's module tracker hooks the
    # autograd graph of inputs that require grad, and under no_grad they have none.
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    attention = [f"{root}.{n}" for n, m in model.named_modules()
                 if isinstance(m, (BidirectionalTemporalAttention, SelfAttention, CrossAttention))]  # fmt: skip
    counted = sum(_core_attention(counts, n) for n in attention)
    total = counter.get_total_flops()
    if not masked:
        how = "every query-key pair" if attention else "no attention"
        return {"flops": int(total), "attention_flops": int(counted), "attention_counted": how}
    cfg = head_config
    pairs = allowed_pairs(
        cfg.num_frames, cfg.num_tokens, cfg.local_frame_range, cfg.num_heads, cfg.num_lookahead_heads, cfg.context_frames,
        cfg.spatial_range,
    )  # fmt: skip
    S = (cfg.num_frames + 2 * cfg.context_frames) * cfg.num_tokens
    core = 4 * (cfg.width // cfg.num_heads) * pairs * cfg.depth
    return {
        "flops": int(total - counted + core),
        "attention_flops": int(core),
        "attention_counted": f"allowed query-key pairs (mask density {pairs / (cfg.num_heads * S * S):.3f})",
    }


class PeakMemory:
    """Peak memory from construction (a reset) to ``read()``.

    On CUDA: ``torch.cuda.max_memory_allocated`` of the device, the tensors this process
    holds there (features cached on the GPU included). Elsewhere: the process's peak resident
    set, Linux's VmHWM reset through /proc/self/clear_refs, so it includes the features held
    in RAM, Python and torch themselves; where that reset is not possible, the process's peak
    since it started (getrusage), said so in ``kind``.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.kind = "process peak RSS (VmHWM)"
        except OSError:
            self.kind = "process peak RSS since start (getrusage)"

    def read(self) -> dict:
        if self.device.type == "cuda":
            mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind.endswith("(VmHWM)"):
            with open("/proc/self/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            mb = kb / 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
        return {"peak_memory_mb": round(mb, 1), "peak_memory_of": self.kind}
