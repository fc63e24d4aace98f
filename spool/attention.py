"""Spool attention, the same function three ways.

Each backend takes q, k, v of shape (B, H, S, hd), S = F * L with F = T + 2 frames when
context frames are on (C_start, 1..T, C_end) and F = T otherwise, and returns (B, H, S, hd).
Heads h < num_lookback_heads look back, the rest look ahead (see ``spool.mask``).

- ``dense``: SDPA with the explicit (H, S, S) boolean mask. The reference; memory O(S^2).
- ``flex``: flex_attention with the BlockMask. Fast on CUDA (compiled). On CPU, torch 2.14.1
  runs the forward only (eagerly, unfused) and raises NotImplementedError on backward.
- ``blocked``: SDPA over each frame's gathered key window (k+1 frames plus its own context
  frame), context-frame queries attend everything densely. Cost linear in T, gradients on
  every device.

Every backend takes the spatial window ``spatial_range`` too (None: every position; see
``spool.mask``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from spool.mask import block_mask, frame_allowed, is_context_frame, patch_near, token_mask

BACKENDS = ("flex", "blocked", "dense")


def dense_attention(
    q, k, v, *, num_frames, num_tokens, local_frame_range, num_lookahead_heads, context_frames, spatial_range=None
):
    mask = token_mask(
        num_frames, num_tokens, local_frame_range, q.shape[1], num_lookahead_heads, context_frames, device=q.device,
        spatial_range=spatial_range,
    )  # (H, S, S), broadcast over B  # fmt: skip
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_compiled_flex = None


def flex_attention(
    q, k, v, *, num_frames, num_tokens, local_frame_range, num_lookahead_heads, context_frames, spatial_range=None
):
    from torch.nn.attention.flex_attention import flex_attention as _flex

    bm = block_mask(
        num_frames, num_tokens, local_frame_range, q.shape[1], num_lookahead_heads, context_frames, device=q.device,
        spatial_range=spatial_range,
    )  # fmt: skip
    if q.device.type == "cuda":
        global _compiled_flex
        if _compiled_flex is None:
            _compiled_flex = torch.compile(_flex)  # without compile flex materialises the full score matrix
        return _compiled_flex(q, k, v, block_mask=bm)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "flex_attention has no backward on CPU (torch %s). Use backend='blocked' (or 'auto') to train on CPU, "
            "or run under torch.no_grad()." % torch.__version__
        )
    # CPU flex is an inference/reference path here: the eager (unfused) kernel is what we want,
    # so its "called without torch.compile" advice is silenced rather than repeated every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        # flex rejects inputs that require grad even under no_grad; detaching there changes nothing.
        return _flex(q.detach(), k.detach(), v.detach(), block_mask=bm)


def _window(num_frames, local_frame_range, lookahead, context_frames, device):
    """Key frames gathered for each clip frame's queries, and which of them count.

    Returns idx (T, W) frame indices into the F frames and valid (T, W) bool. Slot 0 is the
    head group's own context frame (C_start for lookback, C_end for lookahead) when context
    frames are on; the other k+1 slots are the window i-k..i (lookback) or i..i+k (lookahead).
    A slot is valid when ``frame_allowed`` says so and no earlier valid slot holds the same
    frame: for i-k <= 0 the window would hold C_start a second time, which would count its
    keys twice in the softmax.
    """
    T, k = num_frames, local_frame_range
    first = 1 if context_frames else 0
    i = torch.arange(first, first + T, device=device)[:, None]  # (T, 1) query frame
    offsets = torch.arange(0, k + 1, device=device) if lookahead else torch.arange(-k, 1, device=device)
    slots = [i + offsets[None, :]]  # (T, k+1)
    if context_frames:
        own_context = T + 1 if lookahead else 0
        slots.insert(0, torch.full_like(i, own_context))
    raw = torch.cat(slots, dim=1)  # (T, W)
    n_frames = T + 2 if context_frames else T
    in_range = (raw >= 0) & (raw < n_frames)
    allowed = frame_allowed(
        i, raw, num_frames=T, local_frame_range=k, lookahead=lookahead, context_frames=context_frames
    )
    idx = raw.clamp(0, n_frames - 1)
    valid = in_range & allowed
    for w in range(1, raw.shape[1]):  # W <= k + 2, a short loop
        seen = ((idx[:, :w] == idx[:, w : w + 1]) & valid[:, :w]).any(dim=1)
        valid[:, w] &= ~seen
    return idx, valid


def _window_token_mask(idx, valid, num_frames, num_tokens, context_frames, spatial_range):
    """(T, 1 or L, W*L) bool: which gathered keys each clip-frame query may attend.

    Without a spatial window every query of a frame shares its row (broadcast over L); with
    one, a key in a clip frame must also lie near the query's position (``patch_near``).
    """
    L = num_tokens
    keys = valid.repeat_interleave(L, dim=1)[:, None, :]  # (T, 1, W*L)
    if spatial_range is None:
        return keys
    pos = torch.arange(L, device=idx.device)
    near = patch_near(pos[:, None], pos[None, :], num_tokens=L, spatial_range=spatial_range)  # (L, L) query x key
    ctx = is_context_frame(idx, num_frames=num_frames, context_frames=context_frames)  # (T, W)
    near = near[None, :, None, :] | ctx[:, None, :, None]  # (T, L, W, L)
    return keys & near.flatten(2)  # (T, L, W*L)


def _blocked_group(
    q, k, v, *, num_frames, num_tokens, local_frame_range, lookahead, context_frames, spatial_range=None
):
    """Blocked attention for one head group (all heads look the same way)."""
    B, H, S, hd = q.shape
    T, L = num_frames, num_tokens
    Fr = S // L
    qf, kf, vf = (t.view(B, H, Fr, L, hd) for t in (q, k, v))  # (B, H, F, L, hd)
    idx, valid = _window(T, local_frame_range, lookahead, context_frames, q.device)  # (T, W)
    W = idx.shape[1]
    kw = kf[:, :, idx].reshape(B, H, T, W * L, hd)  # (B, H, T, W*L, hd)
    vw = vf[:, :, idx].reshape(B, H, T, W * L, hd)
    mask = _window_token_mask(idx, valid, T, L, context_frames, spatial_range)  # (T, 1 or L, W*L), broadcast over B, H
    first = 1 if context_frames else 0
    qc = qf[:, :, first : first + T]  # (B, H, T, L, hd) clip-frame queries
    out = F.scaled_dot_product_attention(
        qc.reshape(B, H * T, L, hd),
        kw.reshape(B, H * T, W * L, hd),
        vw.reshape(B, H * T, W * L, hd),
        attn_mask=mask.repeat(H, 1, 1),  # (H*T, 1 or L, W*L)
    ).view(B, H, T, L, hd)
    if not context_frames:
        return out.reshape(B, H, S, hd)
    # Context frames attend every frame: 2L dense query rows, cost linear in S.
    qx = torch.cat([qf[:, :, 0], qf[:, :, -1]], dim=2)  # (B, H, 2L, hd)
    ox = F.scaled_dot_product_attention(qx, k, v)  # (B, H, 2L, hd)
    out = torch.cat([ox[:, :, None, :L], out, ox[:, :, None, L:]], dim=2)  # (B, H, T+2, L, hd)
    return out.reshape(B, H, S, hd)


def blocked_attention(
    q, k, v, *, num_frames, num_tokens, local_frame_range, num_lookahead_heads, context_frames, spatial_range=None
):
    H = q.shape[1]
    nb = H - num_lookahead_heads
    outs = []
    for lookahead, heads in ((False, slice(0, nb)), (True, slice(nb, H))):
        if heads.stop == heads.start:
            continue
        outs.append(
            _blocked_group(
                q[:, heads],
                k[:, heads],
                v[:, heads],
                num_frames=num_frames,
                num_tokens=num_tokens,
                local_frame_range=local_frame_range,
                lookahead=lookahead,
                context_frames=context_frames,
                spatial_range=spatial_range,
            )
        )
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (B, H, S, hd)


ATTENTION = {"flex": flex_attention, "blocked": blocked_attention, "dense": dense_attention}
