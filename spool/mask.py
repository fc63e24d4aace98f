"""The Spool attention rule, written once at frame level.

Frames are indexed 0 (C_start), 1..T (the clip), T+1 (C_end); k = local_frame_range.
A query token in frame i may attend a key token in frame j when:

- i is a context frame (0 or T+1): every j (context frames read the whole clip and each other);
- lookback head, 1 <= i <= T:  i-k <= j <= i, or j = 0     (its own past plus C_start);
- lookahead head, 1 <= i <= T: i <= j <= i+k, or j = T+1   (its own future plus C_end).

Within allowed frames all L tokens are visible, so the token mask is the frame mask
expanded over L (token -> frame is ``idx // L``).

Example, T=4, k=1 (rows: query frame i, columns: key frame j, # = allowed):

    lookback heads                 lookahead heads
          C_s 1 2 3 4 C_e                C_s 1 2 3 4 C_e
    C_s    #  # # # #  #         C_s     #  # # # #  #
    1      #  # . . .  .         1       .  # # . .  #
    2      #  # # . .  .         2       .  . # # .  #
    3      #  . # # .  .         3       .  . . # #  #
    4      #  . . # #  .         4       .  . . . #  #
    C_e    #  # # # #  #         C_e     #  # # # #  #

Without context frames (``context_frames=False``, the --no-context ablation) the frames
are just the clip, indexed 0..T-1, and the rule is the window part alone:
lookback i-k <= j <= i, lookahead i <= j <= i+k.

Spatial window (``spatial_range`` r, off when None): between two clip frames a token at
grid position p may attend a token at q only when |row(p) - row(q)| <= r and
|col(p) - col(q)| <= r, on the square grid of L = side^2 tokens (row-major). Context frames
are untouched: they read, and are read from, every position. Frozen-feature tokens of the
same object look alike all over a frame, so a correspondence searched over the whole next
frame is mostly noise; searched near the token's own position it is where the content moved
(docs/benchmarks.md, "Real features").

Everything the attention backends need is derived from ``frame_allowed`` and
``patch_near``: the dense reference mask (``token_mask``), the flex BlockMask
(``block_mask``) and, in ``spool.attention``, the blocked backend's gathered key windows.
"""

from __future__ import annotations

import functools

import torch


def frame_allowed(i, j, *, num_frames, local_frame_range, lookahead, context_frames):
    """May a query in frame ``i`` attend a key in frame ``j``?

    Works on Python ints and on integer tensors (broadcasting), so the same function
    builds the (F, F) table and serves as a flex ``mask_mod`` after ``idx // L``.
    Uses only ``&``, ``|`` and comparisons, which both ints and tensors support.
    """
    k = local_frame_range
    if lookahead:
        window = (j >= i) & (j <= i + k)
    else:
        window = (j >= i - k) & (j <= i)
    if not context_frames:
        return window
    last = num_frames + 1
    from_context = (i == 0) | (i == last)
    to_own_context = (j == last) if lookahead else (j == 0)
    return from_context | window | to_own_context


def patch_near(p, q, *, num_tokens, spatial_range):
    """May a token at grid position ``p`` attend one at ``q`` (row-major indices on the square
    grid of ``num_tokens`` positions) under the spatial window ``spatial_range``?

    Ints or integer tensors, like ``frame_allowed``; None means every position.
    """
    if spatial_range is None:
        return (p == p) & (q == q)  # True, as an int/bool or a tensor of the broadcast shape
    side = grid_side(num_tokens)
    return (abs(p // side - q // side) <= spatial_range) & (abs(p % side - q % side) <= spatial_range)


def grid_side(num_tokens: int) -> int:
    """The side of the square token grid (Spool's crops are square); an error otherwise."""
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"a spatial window needs a square token grid; L = {num_tokens} tokens is not a square")
    return side


def is_context_frame(i, *, num_frames, context_frames):
    """Is frame ``i`` C_start or C_end? (Ints or tensors; always False without context frames.)"""
    if not context_frames:
        return i != i
    return (i == 0) | (i == num_frames + 1)


def spatial_token_mask(num_frames, num_tokens, spatial_range, context_frames=True, device=None):
    """(S, S) bool: the spatial window alone, S = F * L (all True when spatial_range is None)."""
    F = num_frames_total(num_frames, context_frames)
    idx = torch.arange(F * num_tokens, device=device)
    frame, pos = idx // num_tokens, idx % num_tokens
    near = patch_near(pos[:, None], pos[None, :], num_tokens=num_tokens, spatial_range=spatial_range)
    ctx = is_context_frame(frame, num_frames=num_frames, context_frames=context_frames)
    return near | ctx[:, None] | ctx[None, :]


def num_frames_total(num_frames: int, context_frames: bool) -> int:
    """F: frames in the attended sequence (T + 2 with C_start and C_end, else T)."""
    return num_frames + 2 if context_frames else num_frames


def frame_mask(num_frames, local_frame_range, lookahead, context_frames=True, device=None):
    """(F, F) bool: row i = query frame, column j = key frame."""
    F = num_frames_total(num_frames, context_frames)
    idx = torch.arange(F, device=device)
    return frame_allowed(
        idx[:, None],
        idx[None, :],
        num_frames=num_frames,
        local_frame_range=local_frame_range,
        lookahead=lookahead,
        context_frames=context_frames,
    )


def token_mask(
    num_frames,
    num_tokens,
    local_frame_range,
    num_heads,
    num_lookahead_heads,
    context_frames=True,
    device=None,
    spatial_range=None,
):
    """(H, S, S) bool dense reference, S = F * L. Heads h < num_lookback_heads look back."""
    _check_split(num_heads, num_lookahead_heads)
    spatial = spatial_token_mask(num_frames, num_tokens, spatial_range, context_frames, device)  # (S, S)
    groups = []
    for lookahead, n in ((False, num_heads - num_lookahead_heads), (True, num_lookahead_heads)):
        m = frame_mask(num_frames, local_frame_range, lookahead, context_frames, device)  # (F, F)
        m = m.repeat_interleave(num_tokens, 0).repeat_interleave(num_tokens, 1) & spatial  # (S, S)
        groups.append(m.expand(n, -1, -1))
    return torch.cat(groups, dim=0)  # (H, S, S)


def allowed_pairs(
    num_frames, num_tokens, local_frame_range, num_heads, num_lookahead_heads, context_frames=True, spatial_range=None
) -> int:
    """Query-key token pairs the rule allows, summed over the heads: H * S^2 times the mask's
    density. What a Spool head's attention costs when only allowed pairs are computed."""
    _check_split(num_heads, num_lookahead_heads)
    if spatial_range is not None:  # no product form: count the dense mask (small for a FLOP count)
        return int(
            token_mask(
                num_frames, num_tokens, local_frame_range, num_heads, num_lookahead_heads, context_frames,
                spatial_range=spatial_range,
            ).sum()
        )  # fmt: skip
    pairs = 0
    for lookahead, n in ((False, num_heads - num_lookahead_heads), (True, num_lookahead_heads)):
        pairs += n * int(frame_mask(num_frames, local_frame_range, lookahead, context_frames).sum()) * num_tokens**2
    return pairs


def spool_mask_mod(num_frames, num_tokens, local_frame_range, num_lookback_heads, context_frames, spatial_range=None):
    """attention-gym style ``mask_mod(b, h, q_idx, kv_idx)`` for flex_attention."""
    rule = functools.partial(
        frame_allowed, num_frames=num_frames, local_frame_range=local_frame_range, context_frames=context_frames
    )
    context = functools.partial(is_context_frame, num_frames=num_frames, context_frames=context_frames)

    def mask_mod(b, h, q_idx, kv_idx):
        i, j = q_idx // num_tokens, kv_idx // num_tokens
        lookback = (h < num_lookback_heads) & rule(i, j, lookahead=False)
        lookahead = (h >= num_lookback_heads) & rule(i, j, lookahead=True)
        if spatial_range is None:
            return lookback | lookahead
        near = patch_near(q_idx % num_tokens, kv_idx % num_tokens, num_tokens=num_tokens, spatial_range=spatial_range)
        return (lookback | lookahead) & (near | context(i) | context(j))

    window = "" if spatial_range is None else f"_r{spatial_range}"
    mask_mod.__name__ = f"spool_T{num_frames}_L{num_tokens}_k{local_frame_range}_lb{num_lookback_heads}{window}"
    return mask_mod


@functools.lru_cache(maxsize=32)
def _cached_block_mask(
    num_frames, num_tokens, local_frame_range, num_heads, num_lookahead_heads, context_frames, device, spatial_range
):
    from torch.nn.attention.flex_attention import create_block_mask

    S = num_frames_total(num_frames, context_frames) * num_tokens
    mask_mod = spool_mask_mod(
        num_frames, num_tokens, local_frame_range, num_heads - num_lookahead_heads, context_frames, spatial_range
    )
    # B=None: the rule is the same for every clip in the batch.
    return create_block_mask(mask_mod, B=None, H=num_heads, Q_LEN=S, KV_LEN=S, device=device)


def block_mask(
    num_frames,
    num_tokens,
    local_frame_range,
    num_heads,
    num_lookahead_heads,
    context_frames=True,
    device="cpu",
    spatial_range=None,
):
    """flex_attention BlockMask for all heads, cached per (T, L, k, head split, context, device, r)."""
    _check_split(num_heads, num_lookahead_heads)
    return _cached_block_mask(
        num_frames, num_tokens, local_frame_range, num_heads, num_lookahead_heads, context_frames, str(device),
        spatial_range,
    )  # fmt: skip


def _check_split(num_heads, num_lookahead_heads):
    if not 0 <= num_lookahead_heads <= num_heads:
        raise ValueError(
            f"num_lookahead_heads={num_lookahead_heads} must be between 0 and num_heads={num_heads}"
        )


# ---- drawing the mask for `spool show-mask` ----------------------------------------------


def _frame_labels(num_frames, context_frames):
    labels = [str(t) for t in range(1, num_frames + 1)] if context_frames else [str(t) for t in range(num_frames)]
    return ["C_s", *labels, "C_e"] if context_frames else labels


def check_show_mask_options(num_frames, local_frame_range, num_heads, num_lookahead_heads):
    """The checks train-head makes, for `spool show-mask`, in its option names."""
    checks = [
        (num_frames >= 1, f"--frames must be >= 1, got {num_frames}"),
        (local_frame_range >= 0, f"--range must be >= 0, got {local_frame_range}"),
        (num_heads >= 1, f"--heads must be >= 1, got {num_heads}"),
        (0 <= num_lookahead_heads <= num_heads,
         f"--lookahead {num_lookahead_heads} must be between 0 and --heads {num_heads} (the other heads look back)"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def mask_json(num_frames, local_frame_range, num_heads, num_lookahead_heads, context_frames=True):
    """{"lookback": rows, "lookahead": rows}, rows = query frames (0..T+1 with context), 0/1 ints."""
    check_show_mask_options(num_frames, local_frame_range, num_heads, num_lookahead_heads)
    return {
        name: frame_mask(num_frames, local_frame_range, lookahead, context_frames).int().tolist()
        for name, lookahead in (("lookback", False), ("lookahead", True))
    }


def render_mask(num_frames, local_frame_range, num_heads, num_lookahead_heads, context_frames=True):
    """Terminal drawing of both head groups' frame masks side by side (# allowed, . masked)."""
    masks = mask_json(num_frames, local_frame_range, num_heads, num_lookahead_heads, context_frames)
    labels = _frame_labels(num_frames, context_frames)
    w = max(len(s) for s in labels)
    counts = {"lookback": num_heads - num_lookahead_heads, "lookahead": num_lookahead_heads}

    def block(name):
        n = counts[name]
        title = f"{name} ({n} head{'s' if n != 1 else ''})"
        header = " " * (w + 1) + " ".join(s.rjust(w) for s in labels)
        rows = [
            label.ljust(w) + " " + " ".join(("#" if v else ".").rjust(w) for v in row)
            for label, row in zip(labels, masks[name])
        ]
        return [title, header, *rows]

    left, right = block("lookback"), block("lookahead")
    width = max(len(s) for s in left) + 4
    head = f"T={num_frames}, k={local_frame_range}, context frames {'on' if context_frames else 'off'}"
    lines = [head, ""] + [a.ljust(width) + b for a, b in zip(left, right)]
    return "\n".join(line.rstrip() for line in lines)
