import numpy as np
import pytest

from spool.sampling import clip_frame_indices, clip_span, is_short

# (n, frames, clips, stride) -> expected indices, worked out by hand from the rules in
# spool/sampling.py's docstring.
TABLE = [
    # uniform, clips=1: segment centres floor((t + 1/2) * n / frames)
    ((10, 4, 1, None), [[1, 3, 6, 8]]),
    ((8, 4, 1, None), [[1, 3, 5, 7]]),
    ((16, 16, 1, None), [list(range(16))]),
    ((100, 2, 1, None), [[25, 75]]),
    # uniform, several views: offsets (c+1)/(clips+1) inside each segment
    ((10, 4, 2, None), [[0, 3, 5, 8], [1, 4, 6, 9]]),
    ((12, 3, 3, None), [[1, 5, 9], [2, 6, 10], [3, 7, 11]]),
    # uniform, short: frames repeat
    ((3, 4, 1, None), [[0, 1, 1, 2]]),
    ((1, 3, 1, None), [[0, 0, 0]]),
    ((2, 4, 2, None), [[0, 0, 1, 1], [0, 0, 1, 1]]),
    # stride, clips=1: centred, start = floor((n - span) / 2)
    ((10, 4, 1, 2), [[1, 3, 5, 7]]),
    ((7, 4, 1, 2), [[0, 2, 4, 6]]),
    ((20, 3, 1, 4), [[5, 9, 13]]),
    # stride, several views: starts spread from 0 to n - span
    ((10, 3, 3, 2), [[0, 2, 4], [2, 4, 6], [5, 7, 9]]),
    ((9, 2, 2, 1), [[0, 1], [7, 8]]),
    # stride, short: centred, clamped to [0, n-1] (edge frames repeat)
    ((3, 4, 1, 1), [[0, 0, 1, 2]]),
    ((5, 4, 2, 2), [[0, 1, 3, 4], [0, 1, 3, 4]]),  # start -1: -1,1,3,5 clamped
    ((1, 3, 1, 5), [[0, 0, 0]]),
]


@pytest.mark.parametrize(("args", "expected"), TABLE)
def test_hand_written_table(args, expected):
    n, frames, clips, stride = args
    got = clip_frame_indices(n, frames=frames, clips=clips, stride=stride)
    assert got.dtype == np.int64
    assert got.shape == (clips, frames)
    np.testing.assert_array_equal(got, np.array(expected))


@pytest.mark.parametrize("stride", [None, 1, 3])
@pytest.mark.parametrize("clips", [1, 2, 5])
def test_sorted_and_in_range_for_many_lengths(stride, clips):
    for n in range(1, 200, 7):
        idx = clip_frame_indices(n, frames=8, clips=clips, stride=stride)
        assert idx.min() >= 0 and idx.max() <= n - 1
        assert (np.diff(idx, axis=1) >= 0).all()
        if not is_short(n, 8, stride):
            # long enough: no frame is taken twice within a view
            assert (np.diff(idx, axis=1) > 0).all()


def test_uniform_views_cover_the_whole_video():
    idx = clip_frame_indices(1000, frames=10, clips=1)
    assert idx[0, 0] < 100 and idx[0, -1] >= 900


def test_is_short():
    assert clip_span(16, None) == 16 and clip_span(16, 4) == 61
    assert is_short(15, 16, None) and not is_short(16, 16, None)
    assert is_short(60, 16, 4) and not is_short(61, 16, 4)


@pytest.mark.parametrize("bad", [dict(n=0), dict(n=-3), dict(frames=0), dict(clips=0), dict(stride=0)])
def test_bad_arguments_raise(bad):
    kw = dict(n=10, frames=4, clips=1, stride=None) | bad
    with pytest.raises(ValueError):
        clip_frame_indices(kw["n"], frames=kw["frames"], clips=kw["clips"], stride=kw["stride"])
