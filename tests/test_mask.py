import torch

from spool.mask import block_mask, frame_allowed, frame_mask, mask_json, render_mask, token_mask


def table(text):
    """Hand-written mask: one row per query frame, '#' allowed, '.' masked."""
    return torch.tensor([[c == "#" for c in row.split()] for row in text.strip().splitlines()])


# T=4, k=1, frames C_s 1 2 3 4 C_e (same table as the docstring of spool.mask).
LOOKBACK_T4_K1 = table(
    """
    # # # # # #
    # # . . . .
    # # # . . .
    # . # # . .
    # . . # # .
    # # # # # #
    """
)
LOOKAHEAD_T4_K1 = table(
    """
    # # # # # #
    . # # . . #
    . . # # . #
    . . . # # #
    . . . . # #
    # # # # # #
    """
)


def test_frame_mask_matches_hand_table_t4_k1():
    assert torch.equal(frame_mask(4, 1, lookahead=False, context_frames=True), LOOKBACK_T4_K1)
    assert torch.equal(frame_mask(4, 1, lookahead=True, context_frames=True), LOOKAHEAD_T4_K1)


def test_frame_mask_without_context_is_the_window_alone():
    expected_lookback = table(
        """
        # . . .
        # # . .
        . # # .
        . . # #
        """
    )
    assert torch.equal(frame_mask(4, 1, lookahead=False, context_frames=False), expected_lookback)
    assert torch.equal(frame_mask(4, 1, lookahead=True, context_frames=False), expected_lookback.T)


def test_frame_mask_range_longer_than_clip():
    # T=2 < k=3: every clip frame sees all of its past (lookback) or future (lookahead).
    assert torch.equal(
        frame_mask(2, 3, lookahead=False),
        table(
            """
            # # # #
            # # . .
            # # # .
            # # # #
            """
        ),
    )
    assert torch.equal(
        frame_mask(2, 3, lookahead=True),
        table(
            """
            # # # #
            . # # #
            . . # #
            # # # #
            """
        ),
    )


def test_frame_mask_k0_sees_only_itself_and_its_context():
    expected = table(
        """
        # # # # #
        # # . . .
        # . # . .
        # . . # .
        # # # # #
        """
    )
    assert torch.equal(frame_mask(3, 0, lookahead=False), expected)
    assert torch.equal(frame_mask(3, 0, lookahead=True), expected.flip(0, 1))


def test_frame_allowed_on_ints_agrees_with_tensor_table():
    for lookahead in (False, True):
        m = frame_mask(5, 2, lookahead)
        for i in range(7):
            for j in range(7):
                got = frame_allowed(i, j, num_frames=5, local_frame_range=2, lookahead=lookahead, context_frames=True)
                assert bool(got) == bool(m[i, j]), (lookahead, i, j)


def test_token_mask_expands_frames_over_tokens_per_head():
    L = 3
    m = token_mask(4, L, 1, num_heads=3, num_lookahead_heads=1)
    assert m.shape == (3, 6 * L, 6 * L)
    assert torch.equal(m[0], m[1])  # both lookback heads
    lookback_tokens = LOOKBACK_T4_K1.repeat_interleave(L, 0).repeat_interleave(L, 1)
    assert torch.equal(m[0], lookback_tokens)
    assert torch.equal(m[2], LOOKAHEAD_T4_K1.repeat_interleave(L, 0).repeat_interleave(L, 1))


def test_block_mask_matches_dense_mask_and_is_cached():
    T, L, k, H, na = 3, 5, 1, 4, 1
    bm = block_mask(T, L, k, H, na)
    assert bm is block_mask(T, L, k, H, na)  # cached per shape and split
    assert bm is not block_mask(T, L, k, H, 2)
    S = (T + 2) * L
    q_idx = torch.arange(S)[:, None]
    kv_idx = torch.arange(S)[None, :]
    dense = token_mask(T, L, k, H, na)
    for h in range(H):
        got = bm.mask_mod(torch.tensor(0), torch.tensor(h), q_idx, kv_idx)
        assert torch.equal(got, dense[h]), h


def test_mask_json_rows_are_query_frames():
    out = mask_json(4, 1, num_heads=6, num_lookahead_heads=3)
    assert out["lookback"] == LOOKBACK_T4_K1.int().tolist()
    assert out["lookahead"] == LOOKAHEAD_T4_K1.int().tolist()


def test_render_mask_labels_and_zero_head_group():
    text = render_mask(4, 1, num_heads=6, num_lookahead_heads=0)
    assert "lookback (6 heads)" in text
    assert "lookahead (0 heads)" in text
    lines = text.splitlines()
    assert any(line.startswith("C_s") for line in lines)
    assert any(line.startswith("C_e") for line in lines)
    row_1 = next(line for line in lines if line.startswith("1 "))
    # lookback row for frame 1 then lookahead row for frame 1, side by side.
    assert row_1.split() == ["1", "#", "#", ".", ".", ".", ".", "1", ".", "#", "#", ".", ".", "#"]


# ---- the spatial window ------------------------------------------------------------------


def test_patch_near_on_a_3x3_grid_by_hand():
    from spool.mask import patch_near

    # positions 0..8 row-major; r = 1 around the centre (4) is everything, around a corner (0) its 2x2 block
    near = patch_near(torch.arange(9)[:, None], torch.arange(9)[None, :], num_tokens=9, spatial_range=1)
    expected = table(
        """
        # # . # # . . . .
        # # # # # # . . .
        . # # . # # . . .
        # # . # # . # # .
        # # # # # # # # #
        . # # . # # . # #
        . . . # # . # # .
        . . . # # # # # #
        . . . . # # . # #
        """
    )
    assert torch.equal(near, expected)
    assert bool(patch_near(0, 8, num_tokens=9, spatial_range=None))  # no window: every position
    assert torch.equal(patch_near(torch.arange(9)[:, None], torch.arange(9)[None, :], num_tokens=9, spatial_range=0),
                       torch.eye(9, dtype=torch.bool))  # fmt: skip


def test_spatial_window_applies_between_clip_frames_only():
    from spool.mask import spatial_token_mask

    # T=1, L=4 (2x2), r=0: frames C_s, 1, C_e; a clip token sees only its own position in clip
    # frames, while context frames read and are read from every position
    m = spatial_token_mask(1, 4, 0, context_frames=True)  # (12, 12)
    clip = slice(4, 8)
    assert torch.equal(m[clip, clip], torch.eye(4, dtype=torch.bool))
    assert m[:4].all() and m[8:].all() and m[:, :4].all() and m[:, 8:].all()
    assert torch.equal(spatial_token_mask(2, 4, 0, context_frames=False), torch.eye(4, dtype=torch.bool).repeat(2, 2))


def test_token_mask_is_the_frame_rule_and_the_spatial_window():
    from spool.mask import spatial_token_mask

    T, L, k = 3, 4, 1
    plain = token_mask(T, L, k, num_heads=2, num_lookahead_heads=1)
    windowed = token_mask(T, L, k, num_heads=2, num_lookahead_heads=1, spatial_range=0)
    assert torch.equal(windowed, plain & spatial_token_mask(T, L, 0))
    assert windowed.sum() < plain.sum()


def test_a_spatial_window_needs_a_square_grid():
    import pytest

    from spool.mask import patch_near

    with pytest.raises(ValueError, match="L = 6 tokens is not a square"):
        patch_near(0, 1, num_tokens=6, spatial_range=1)
