"""The Spool temporal head, top to bottom in the order data flows.

patches (B, T, L, D_in)
  -> ContextFraming: project to dim, add a temporal embedding, wrap in [C_start, x_1..x_T, C_end]
  -> depth x BTTBlock: bidirectional temporal attention (lookback + lookahead heads) and an MLP
  -> ContextPooling: mean over the tokens of the final C_start and C_end, LayerNorm, linear
  -> logits (B, num_classes)

The attention rule lives in ``spool.mask``; the three backends that compute it in
``spool.attention``.

The paper's two references are the same head with another attention (``HeadConfig.attention``),
so framing, width, depth, MLP and pooling are shared and only who attends whom changes:

- "full": every token attends all F*L tokens (``SelfAttention`` in a BTTBlock): the
  quadratic reference, one fused SDPA call without a mask.
- "factorized": ``FactorizedBlock``, spatial then temporal: a token first attends the L tokens
  of its own frame, then the F tokens at its own position in every frame (F = T+2 with
  context frames), then the MLP. One more attention layer per block than the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from spool.attention import ATTENTION, BACKENDS
from spool.mask import grid_side, num_frames_total

log = logging.getLogger(__name__)

ATTENTIONS = ("spool", "full", "factorized")  # HeadConfig.attention; also the --head names


@dataclass(frozen=True)
class HeadConfig:
    in_dim: int  # D_in of the cached features
    num_frames: int  # T
    num_tokens: int  # L (tokens per frame)
    num_classes: int
    dim: int | None = None  # head width; None -> in_dim
    depth: int = 4
    num_heads: int = 6
    num_lookahead_heads: int = 3  # lookback = num_heads - lookahead
    local_frame_range: int = 2  # k
    # spatial window r between clip frames (spool.mask): a token attends positions within r
    # rows and columns of its own; None = every position
    spatial_range: int | None = None
    context_frames: bool = True  # False = the --no-context ablation
    spatial_embedding: bool = False  # a learned vector per token position, shared by the T frames
    # local correlation (LocalCorrelation): each frame token also gets its similarity to the
    # tokens within correlation_range rows and columns in the frames up to correlation_frames
    # away (train-head: the head's --range); None = off
    correlation_range: int | None = None
    correlation_frames: int = 2
    # standardise each token's cosines over its neighbourhood (per frame offset), and add their
    # products with the token's column and row (see LocalCorrelation)
    correlation_token_norm: bool = True
    correlation_moments: bool = True
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    backend: str = "auto"  # auto | flex | blocked | dense
    # spool: the local-window rule above; full | factorized: the paper's references, for which
    # num_lookahead_heads, local_frame_range and backend are unused
    attention: str = "spool"

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"HeadConfig.attention={self.attention!r} is unknown; use one of {', '.join(ATTENTIONS)}")
        for name in ("in_dim", "num_frames", "num_tokens", "num_classes", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"HeadConfig.dim must be >= 1 or None (= in_dim), got {self.dim}")
        spool = self.attention == "spool"  # the other attentions do not read the head split or the range
        if spool and not 0 <= self.num_lookahead_heads <= self.num_heads:
            raise ValueError(
                f"HeadConfig.num_lookahead_heads={self.num_lookahead_heads} must be between 0 and "
                f"num_heads={self.num_heads} (the other heads look back)"
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"head width dim={self.width} is not divisible by num_heads={self.num_heads}; "
                f"choose dim as a multiple of num_heads"
            )
        if spool and self.local_frame_range < 0:
            raise ValueError(f"HeadConfig.local_frame_range must be >= 0, got {self.local_frame_range}")
        if spool and self.spatial_range is not None:
            if self.spatial_range < 0:
                raise ValueError(f"HeadConfig.spatial_range must be >= 0 or None, got {self.spatial_range}")
            grid_side(self.num_tokens)  # a square grid, or a clear error
        if self.correlation_range is not None:
            if self.correlation_range < 0:
                raise ValueError(f"HeadConfig.correlation_range must be >= 0 or None, got {self.correlation_range}")
            if not 1 <= self.correlation_frames <= self.num_frames - 1:
                raise ValueError(
                    f"HeadConfig.correlation_frames={self.correlation_frames} must be between 1 and num_frames - 1 = "
                    f"{self.num_frames - 1}: the frames each way a token is correlated with"
                )
            if self.correlation_token_norm and (self.correlation_range == 0 or self.num_tokens == 1):
                raise ValueError(
                    "HeadConfig.correlation_token_norm standardises a token's cosines over its neighbourhood, which "
                    f"needs two positions or more: correlation_range={self.correlation_range}, "
                    f"num_tokens={self.num_tokens} leave one"
                )
            grid_side(self.num_tokens)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HeadConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"HeadConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"HeadConfig.backend={self.backend!r} is unknown; use one of auto, {', '.join(BACKENDS)}")

    @property
    def num_lookback_heads(self) -> int:
        return self.num_heads - self.num_lookahead_heads

    @property
    def width(self) -> int:
        """The head width actually used: dim, or in_dim when dim is None."""
        return self.in_dim if self.dim is None else self.dim


def resolve_backend(requested: str, device, needs_grad: bool) -> str:
    """Pick the attention backend for a device. "auto": flex on CUDA, blocked elsewhere.

    flex_attention has no backward on CPU, so training there uses the blocked backend.
    """
    device = torch.device(device)
    if requested == "auto":
        return "flex" if device.type == "cuda" else "blocked"
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; use one of auto, {', '.join(BACKENDS)}")
    if requested == "flex" and device.type != "cuda" and needs_grad:
        raise ValueError(
            f"backend 'flex' cannot train on {device.type}: flex_attention has no backward there "
            f"(torch {torch.__version__}). Use 'blocked' or 'auto', or build with needs_grad=False for inference."
        )
    return requested


class LocalCorrelation(nn.Module):
    """(B, T, L, D_in) standardised patches -> (B, T, L, dim): a local cost volume per token.

    Token p of frame t gets its cosine similarity to the tokens within ``correlation_range``
    rows and columns of p in each frame t+tau, 0 < |tau| <= frames (zero where that frame or
    position is outside the clip): 2 * frames * (2r+1)^2 numbers. Where the content of p went,
    and from where it came, is what tells the direction of motion (a scene moving left from a
    scene moving right); frozen-feature tokens of one object look alike all over a frame, so
    attention must otherwise find that needle itself, and on small data it memorises the
    content instead (docs/benchmarks.md, "Real features"). The correlation layers of flow
    networks and of correlation networks for video (Wang et al., CVPR 2020) give it the same way.

    ``token_norm``: each token's cosines to one frame are standardised over its neighbourhood
    (mean 0, std 1 over the positions inside the frame). What matters is which neighbour matches
    best, not how alike a photograph's textures are in general; without it the head learned
    the latter too and generalised worse to unseen photographs.
    ``moments``: the cosines are also given times the token's column and row (in [-1, 1], 0 at
    the centre). Averaged over a frame, the plain cosines say how the frame moves as a whole
    (pan, tilt); zoom and rotation move the two halves of a frame opposite ways and cancel out
    there, and the position-weighted copies are what keeps them (the first spatial moments of
    the motion field, an affine motion model's linear terms).
    The features are then standardised with dataset statistics (the differences that matter are
    a few hundredths of a cosine) and projected to the head width.
    """

    def __init__(self, dim, num_tokens, frames, correlation_range, token_norm=True, moments=True):
        super().__init__()
        side = grid_side(num_tokens)
        r = correlation_range
        self.offsets = [tau for tau in range(-frames, frames + 1) if tau != 0]
        rows, cols = torch.arange(num_tokens) // side, torch.arange(num_tokens) % side
        shifts = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        nbr_rows = torch.stack([rows + dy for dy, _ in shifts], 1)  # (L, n) neighbour row of each token
        nbr_cols = torch.stack([cols + dx for _, dx in shifts], 1)
        inside = (nbr_rows >= 0) & (nbr_rows < side) & (nbr_cols >= 0) & (nbr_cols < side)
        self.register_buffer("neighbours", nbr_rows.clamp(0, side - 1) * side + nbr_cols.clamp(0, side - 1), persistent=False)
        self.register_buffer("inside", inside.float(), persistent=False)  # (L, n)
        centre = (side - 1) / 2
        self.register_buffer("position", torch.stack([cols, rows], 1).float().sub(centre).div(max(centre, 1)), persistent=False)  # (L, 2)
        self.token_norm, self.moments = token_norm, moments
        num_features = len(self.offsets) * len(shifts) * (3 if moments else 1)
        self.norm = nn.BatchNorm1d(num_features, affine=False)
        self.proj = nn.Linear(num_features, dim)

    def forward(self, x):
        B, T, L, D = x.shape
        z = nn.functional.normalize(x, dim=-1)  # (B, T, L, D)
        t = torch.arange(T, device=x.device)
        count = self.inside.sum(-1, keepdim=True)  # (L, 1) neighbours inside the frame
        features = []
        for tau in self.offsets:
            other = (t + tau).clamp(0, T - 1)
            valid = ((t + tau >= 0) & (t + tau < T)).to(x.dtype)  # (T,) frame t+tau inside the clip
            sim = z @ z[:, other].transpose(-1, -2)  # (B, T, L, L) every pair of positions
            near = torch.gather(sim, 3, self.neighbours.expand(B, T, -1, -1))  # (B, T, L, n)
            if self.token_norm:
                mean = (near * self.inside).sum(-1, keepdim=True) / count
                var = ((near - mean) * self.inside).square().sum(-1, keepdim=True) / count
                near = (near - mean) / (var + 1e-4).sqrt()  # the floor: flat regions stay small
            features.append(near * self.inside * valid[:, None, None])
        c = torch.cat(features, dim=-1)  # (B, T, L, 2*frames*n)
        if self.moments:
            c = torch.cat([c, c * self.position[:, :1], c * self.position[:, 1:]], dim=-1)  # (B, T, L, 3*...)
        c = self.norm(c.flatten(0, 2)).view(c.shape)  # (B = 0, a rank's empty share, has no -1 to infer)
        return self.proj(c)  # (B, T, L, dim)


class ContextFraming(nn.Module):
    """(B, T, L, D_in) -> (B, F*L, dim): input standardisation, projection, temporal (and
    optionally spatial) embedding, optionally the local correlation, C_start/C_end frames."""

    def __init__(
        self, in_dim, dim, num_frames, num_tokens, context_frames, spatial_embedding=False, correlation=None
    ):
        super().__init__()
        # Frozen ViT features are LayerNormed per token but keep large per-dimension offsets
        # shared by every token, which swamp the small frame-to-frame changes the head must
        # read. Standardising each input dimension with dataset statistics (as linear probes
        # do) removes them. Measured on the time-reversal toy: docs/benchmarks.md "Temporal toy".
        self.input_norm = nn.BatchNorm1d(in_dim, affine=False)
        self.proj = nn.Linear(in_dim, dim)
        # Unit scale, like sinusoidal position encodings, and the scale of the projected content
        # (see SpoolHead): at the usual 0.02 the frame position is lost in the content and the
        # head starts out blind to order.
        self.time_embed = nn.Parameter(torch.zeros(num_frames, dim))  # one per frame, shared by its L tokens
        nn.init.trunc_normal_(self.time_embed, std=1.0, a=-2.0, b=2.0)
        # Frame tokens otherwise carry no position of their own: a head could not tell where in
        # the frame a matching token sits. Small, so it does not drown the content at first.
        self.space_embed = nn.Parameter(torch.zeros(num_tokens, dim)) if spatial_embedding else None
        if spatial_embedding:
            nn.init.trunc_normal_(self.space_embed, std=0.1, a=-0.2, b=0.2)
        self.correlation = correlation  # LocalCorrelation or None
        if context_frames:
            # Learned start and end frames, shared over the batch, one vector per token position.
            self.start = nn.Parameter(torch.zeros(num_tokens, dim))
            self.end = nn.Parameter(torch.zeros(num_tokens, dim))
            nn.init.trunc_normal_(self.start, std=0.02)
            nn.init.trunc_normal_(self.end, std=0.02)
        self.context_frames = context_frames

    def forward(self, patches):
        B, T, L, D = patches.shape
        x = self.input_norm(patches.reshape(B * T * L, D)).view(B, T, L, D)
        tokens = self.proj(x) + self.time_embed[:, None, :]  # (B, T, L, dim)
        if self.space_embed is not None:
            tokens = tokens + self.space_embed  # (L, dim) broadcast over B and T
        if self.correlation is not None:
            tokens = tokens + self.correlation(x)
        x = tokens
        if self.context_frames:
            start = self.start.expand(B, 1, -1, -1)  # (B, 1, L, dim)
            end = self.end.expand(B, 1, -1, -1)
            x = torch.cat([start, x, end], dim=1)  # (B, T+2, L, dim)
        return x.flatten(1, 2)  # (B, F*L, dim)


class BidirectionalTemporalAttention(nn.Module):
    """Multi-head attention whose heads look back or ahead in time (rule in spool.mask)."""

    def __init__(
        self,
        dim,
        num_heads,
        num_lookahead_heads,
        num_frames,
        num_tokens,
        local_frame_range,
        context_frames,
        backend,
        dropout=0.0,
        spatial_range=None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # one fused projection
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.backend = backend
        self.rule = dict(
            num_frames=num_frames,
            num_tokens=num_tokens,
            local_frame_range=local_frame_range,
            num_lookahead_heads=num_lookahead_heads,
            context_frames=context_frames,
            spatial_range=spatial_range,
        )

    def forward(self, x):
        B, S, D = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, S, hd)
        # B = 0 is a process's empty share of a small last batch under torchrun: it must still
        # run forward and backward (the collectives), but attention kernels need not accept it.
        y = ATTENTION[self.backend](q, k, v, **self.rule) if B else v  # (B, H, S, hd)
        y = y.transpose(1, 2).reshape(B, S, D)  # (B, S, dim)
        return self.dropout(self.proj(y))


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over dim 1 of (N, S, dim): one fused SDPA call, no mask.

    The full head runs it over all S = F*L tokens of a clip (N = B); the factorized head over
    the L tokens of each frame (N = B*F) and over the F frames at each token position (N = B*L).
    Its parameters are named as BidirectionalTemporalAttention's (qkv, proj), so a full head's
    weights load into a Spool head and back.
    """

    def __init__(self, dim, num_heads, dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        N, S, D = x.shape
        qkv = self.qkv(x).view(N, S, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, H, S, hd)
        # N = 0: an empty share of a batch under torchrun (see BidirectionalTemporalAttention)
        y = F.scaled_dot_product_attention(q, k, v) if N else v  # (N, H, S, hd)
        y = y.transpose(1, 2).reshape(N, S, D)  # (N, S, dim)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class BTTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: HeadConfig, backend: str):
        super().__init__()
        dim = cfg.width
        self.ln_1 = nn.LayerNorm(dim)
        if cfg.attention == "full":  # the quadratic reference: every token attends every token
            self.attn = SelfAttention(dim, cfg.num_heads, cfg.dropout)
        else:
            self.attn = BidirectionalTemporalAttention(
                dim,
                cfg.num_heads,
                cfg.num_lookahead_heads,
                cfg.num_frames,
                cfg.num_tokens,
                cfg.local_frame_range,
                cfg.context_frames,
                backend,
                cfg.dropout,
                cfg.spatial_range,
            )
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # (B, S, dim)
        x = x + self.mlp(self.ln_2(x))
        return x


class FactorizedBlock(nn.Module):
    """Spatial then temporal attention, then the MLP, each pre-norm with a residual
    (TimeSformer's divided space-time attention, space first):

        x = x + space_attn(LN(x))  # token (f, p) attends (f, q) for every q: its own frame's L tokens
        x = x + time_attn(LN(x))   # token (f, p) attends (g, p) for every g: its position in all F frames
        x = x + mlp(LN(x))

    f, g index the F frames (C_start, 1..T, C_end with context frames), p, q the L token
    positions. One sublayer moves information within a frame or along a position only; the
    two together reach every token, so one block mixes as far as one full block, in two hops.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        dim = cfg.width
        self.frames = num_frames_total(cfg.num_frames, cfg.context_frames)  # F
        self.num_tokens = cfg.num_tokens  # L
        self.ln_space = nn.LayerNorm(dim)
        self.space_attn = SelfAttention(dim, cfg.num_heads, cfg.dropout)
        self.ln_time = nn.LayerNorm(dim)
        self.time_attn = SelfAttention(dim, cfg.num_heads, cfg.dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x):
        B, S, D = x.shape
        Fr, L = self.frames, self.num_tokens
        h = self.ln_space(x).view(B * Fr, L, D)  # (B*F, L, dim): one sequence per frame
        x = x + self.space_attn(h).view(B, S, D)
        h = self.ln_time(x).view(B, Fr, L, D).transpose(1, 2).reshape(B * L, Fr, D)  # (B*L, F, dim): one per position
        x = x + self.time_attn(h).view(B, L, Fr, D).transpose(1, 2).reshape(B, S, D)
        x = x + self.mlp(self.ln_2(x))  # (B, S, dim)
        return x


class ContextPooling(nn.Module):
    """(B, F*L, dim) -> logits (B, num_classes).

    With context frames: mean over the L tokens of C_start and of C_end, concatenated (2*dim).
    Without: mean over all frame tokens (dim).
    """

    def __init__(self, dim, num_classes, num_frames, num_tokens, context_frames):
        super().__init__()
        self.frames = num_frames_total(num_frames, context_frames)
        self.num_tokens = num_tokens
        self.context_frames = context_frames
        pooled = 2 * dim if context_frames else dim
        self.norm = nn.LayerNorm(pooled)
        self.classifier = nn.Linear(pooled, num_classes)

    def forward(self, x):
        B, S, D = x.shape
        x = x.view(B, self.frames, self.num_tokens, D)  # (B, F, L, dim)
        if self.context_frames:
            pooled = torch.cat([x[:, 0].mean(1), x[:, -1].mean(1)], dim=-1)  # (B, 2*dim)
        else:
            pooled = x.mean(dim=(1, 2))  # (B, dim)
        return self.classifier(self.norm(pooled))  # (B, num_classes)


class SpoolHead(nn.Module):
    """The temporal head: ``SpoolHead(cfg)(patches (B, T, L, D_in)) -> logits (B, num_classes)``.

    The attention backend is resolved here, once, for ``device`` (default: CUDA when
    available, else CPU) and the parameters are placed there. ``needs_grad=False`` allows
    backend="flex" for inference on CPU. ``cfg.attention`` "full" and "factorized" build
    the paper's references from the same parts; they always use SDPA without a mask.
    """

    def __init__(self, cfg: HeadConfig, device=None, needs_grad: bool = True):
        super().__init__()
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = cfg
        correlation = None
        if cfg.correlation_range is not None:
            correlation = LocalCorrelation(
                cfg.width, cfg.num_tokens, cfg.correlation_frames, cfg.correlation_range, cfg.correlation_token_norm,
                cfg.correlation_moments,
            )  # fmt: skip
        self.framing = ContextFraming(
            cfg.in_dim, cfg.width, cfg.num_frames, cfg.num_tokens, cfg.context_frames, cfg.spatial_embedding,
            correlation,
        )  # fmt: skip
        if cfg.attention == "spool":
            self.backend = resolve_backend(cfg.backend, device, needs_grad)
            log.info("SpoolHead attention backend: %s (requested %r, device %s)", self.backend, cfg.backend, device)
        else:
            self.backend = "sdpa"  # no mask: nothing to choose
        if cfg.attention == "factorized":
            blocks = [FactorizedBlock(cfg) for _ in range(cfg.depth)]
        else:  # spool and full: the same block, another attention in it
            blocks = [BTTBlock(cfg, self.backend) for _ in range(cfg.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.pool = ContextPooling(cfg.width, cfg.num_classes, cfg.num_frames, cfg.num_tokens, cfg.context_frames)
        self.apply(_init_weights)
        # Variance-preserving input projection: standardised inputs come out at unit scale,
        # the scale of the temporal embedding, whatever in_dim is.
        _variance_preserving(self.framing.proj)
        if correlation is not None:  # the standardised correlation too: at unit scale, like the content
            _variance_preserving(correlation.proj)
        self.to(device)

    def forward(self, patches):
        cfg = self.cfg
        if patches.ndim != 4 or tuple(patches.shape[1:]) != (cfg.num_frames, cfg.num_tokens, cfg.in_dim):
            raise ValueError(
                f"SpoolHead expects patches of shape (B, T={cfg.num_frames}, L={cfg.num_tokens}, "
                f"D_in={cfg.in_dim}), got {tuple(patches.shape)}; the features and HeadConfig disagree"
            )
        x = self.framing(patches)  # (B, F*L, dim)
        for block in self.blocks:
            x = block(x)  # (B, F*L, dim)
        return self.pool(x)  # (B, num_classes)

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _variance_preserving(linear: nn.Linear) -> None:
    std = linear.in_features**-0.5
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)


def _init_weights(module):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
