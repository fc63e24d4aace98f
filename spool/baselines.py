"""Baseline heads, for comparing Spool with published frozen-feature protocols.

Every head declares the inputs it reads in ``inputs`` (a tuple of "patches" and/or "cls")
and its ``forward`` takes exactly those tensors, in that order:

    patches  (B, T, L, D)   per-frame patch tokens
    cls      (B, T, D)      per-frame CLS token

so the loader never reads patches for a head that only needs CLS.

- ``MeanLinearHead``: DINOv2's video protocol: average the per-frame CLS tokens over time,
  then one linear layer. DINOv2's own ``LinearClassifier`` is a bare ``nn.Linear``; here a
  BatchNorm without affine parameters sits in front by default (MAE's linear probe), so one
  learning rate works whatever the scale of the features. ``norm="none"`` gives the bare
  DINOv2 layer, ``norm="layernorm"`` a LayerNorm.
- ``AttentiveProbe``: V-JEPA's frozen evaluation (``AttentiveClassifier``): one learned
  query cross-attends over all T*L tokens in a block with an MLP (pre-norm, residual),
  then a linear classifier. Like V-JEPA's, it has no position embedding of its own; the
  features here come from an image model run frame by frame, so without
  ``temporal_embedding=True`` (a learned per-frame embedding, zero at init) the probe cannot
  tell frame order apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("batchnorm", "layernorm", "none")


@dataclass(frozen=True)
class MeanLinearConfig:
    in_dim: int
    num_classes: int
    norm: str = "batchnorm"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"MeanLinearConfig.norm must be one of {NORMS}, got {self.norm!r}")


class MeanLinearHead(nn.Module):
    inputs = ("cls",)

    def __init__(self, cfg: MeanLinearConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.norm == "batchnorm":
            self.norm = nn.BatchNorm1d(cfg.in_dim, affine=False, eps=1e-6)
        elif cfg.norm == "layernorm":
            self.norm = nn.LayerNorm(cfg.in_dim)
        else:
            self.norm = nn.Identity()
        self.linear = nn.Linear(cfg.in_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        x = cls.float().mean(dim=1)  # (B, T, D) -> (B, D)
        return self.linear(self.norm(x))  # (B, num_classes)


@dataclass(frozen=True)
class AttentiveProbeConfig:
    in_dim: int
    num_classes: int
    num_frames: int
    num_heads: int = 6
    mlp_ratio: float = 4.0
    temporal_embedding: bool = False

    def __post_init__(self):
        if self.in_dim % self.num_heads:
            raise ValueError(
                f"AttentiveProbeConfig: in_dim {self.in_dim} is not divisible by num_heads {self.num_heads}"
            )


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, Q, D = q.shape
        N, H = x.shape[1], self.num_heads
        q = self.q(q).view(B, Q, H, D // H).transpose(1, 2)  # (B, H, Q, hs)
        k, v = self.kv(x).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, hs)
        # B = 0 is a process's empty share of a small last batch under torchrun: SDPA kernels need
        # not accept it, but the (empty) result must still depend on every weight for DDP.
        y = F.scaled_dot_product_attention(q, k, v) if B else q + v.sum(2, keepdim=True)  # (B, H, Q, hs)
        return self.proj(y.transpose(1, 2).reshape(B, Q, D))


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.xattn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = q + self.xattn(q, self.norm1(x))  # V-JEPA normalises the keys/values, not the query
        return q + self.mlp(self.norm2(q))


class AttentiveProbe(nn.Module):
    inputs = ("patches",)

    def __init__(self, cfg: AttentiveProbeConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.in_dim
        self.query = nn.Parameter(torch.zeros(1, 1, D))
        self.frame_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, 1, D)) if cfg.temporal_embedding else None
        self.block = CrossAttentionBlock(D, cfg.num_heads, cfg.mlp_ratio)
        self.linear = nn.Linear(D, cfg.num_classes)
        # V-JEPA's init: truncated normal (std 0.02) for the query and all linear weights.
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        B, T, L, D = patches.shape
        x = patches.float()
        if self.frame_embed is not None:
            x = x + self.frame_embed  # (B, T, L, D)
        x = x.reshape(B, T * L, D)  # all tokens of the clip
        q = self.block(self.query.expand(B, -1, -1), x)  # (B, 1, D)
        return self.linear(q.squeeze(1))  # (B, num_classes)
