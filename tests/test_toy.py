import time
from collections import Counter

import numpy as np
import pytest

from spool.decode import read_video
from spool.sources import load_source
from spool.toy import TOY_CLASSES, TOY_PAIRS, make_toy, toy_pair_frames


def test_twins_are_exact_time_reversals():
    for pair in range(len(TOY_PAIRS)):
        forward, backward = toy_pair_frames(12, 32, seed=3, pair=pair, index=1)
        assert forward.shape == (12, 32, 32, 3) and forward.dtype == np.uint8
        np.testing.assert_array_equal(backward, forward[::-1])
        # the frames must change over time, or order would carry no information
        assert not np.array_equal(forward[0], forward[-1])
        # same frames, same mean: what a mean-pooling model sees is identical
        np.testing.assert_array_equal(forward.mean(0), backward.mean(0))


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, _ = toy_pair_frames(8, 32, seed=0, pair=0, index=0)
    b, _ = toy_pair_frames(8, 32, seed=0, pair=0, index=0)
    c, _ = toy_pair_frames(8, 32, seed=1, pair=0, index=0)
    d, _ = toy_pair_frames(8, 32, seed=0, pair=0, index=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_motions_go_the_way_their_names_say():
    def centre_x(frame):  # column centre of mass of the bright square
        mask = frame.max(-1) > 140
        return np.nonzero(mask)[1].mean()

    right, left = toy_pair_frames(8, 64, seed=0, pair=0, index=0)
    assert centre_x(right[-1]) > centre_x(right[0]) + 10
    grow, _ = toy_pair_frames(8, 64, seed=0, pair=1, index=0)
    assert (grow[-1].max(-1) > 140).sum() > 4 * (grow[0].max(-1) > 140).sum()
    appear, _ = toy_pair_frames(8, 64, seed=0, pair=2, index=0)
    assert np.abs(appear[0].astype(int) - appear[0].mean((0, 1))).max() < 80  # no square yet


def test_toy_dataset_files_decode_balanced_and_reversed(toy_videos):
    source = load_source(toy_videos)
    assert source.format == "folder"
    assert source.class_names == sorted(TOY_CLASSES)
    assert Counter(e.label for e in source.entries) == {i: 4 for i in range(6)}
    # lossless coding: a decoded video is exactly its twin's decoded frames reversed
    for a_name, b_name in TOY_PAIRS:
        a = read_video(toy_videos / a_name / f"{a_name}_001.mp4", frames=16, size=32, crop_pct=1.0, decoder="pyav")
        b = read_video(toy_videos / b_name / f"{b_name}_001.mp4", frames=16, size=32, crop_pct=1.0, decoder="decord")
        assert a.num_frames == b.num_frames == 16
        np.testing.assert_array_equal(a.frames[0], b.frames[0, ::-1])
        assert not np.array_equal(a.frames[0], b.frames[0])
        # and close to the generated frames (only the YUV 4:2:0 round trip in between)
        forward, _ = toy_pair_frames(16, 32, seed=0, pair=TOY_PAIRS.index((a_name, b_name)), index=1)
        assert np.abs(a.frames[0].astype(int) - forward.astype(int)).mean() < 6  # measured 1.5-3.4


def test_make_toy_is_fast_and_deterministic(tmp_path):
    # CPU time, not wall time: other test processes share the machine. Measured ~0.5 s.
    start = time.process_time()
    paths = make_toy(tmp_path / "a")  # the default set: 6 classes x 8 videos, 16 frames of 64x64
    elapsed = time.process_time() - start
    assert len(paths) == 48
    assert elapsed < 5, f"make_toy took {elapsed:.1f}s of CPU"
    again = make_toy(tmp_path / "b", videos_per_class=2)
    assert [p.relative_to(tmp_path / "b") for p in again] == [p.relative_to(tmp_path / "a") for p in paths if int(p.stem[-3:]) < 2]
    for p in again:
        twin = tmp_path / "a" / p.relative_to(tmp_path / "b")
        # Same pixels for a seed. (Bytes are usually identical too, but x264 once gave a
        # different bitstream for the same input within a long test session; lossless
        # coding makes the pixels independent of that.)
        a = read_video(p, frames=16, size=64, decoder="pyav").frames
        b = read_video(twin, frames=16, size=64, decoder="pyav").frames
        np.testing.assert_array_equal(a, b, err_msg=f"{p.name} differs between two runs with seed 0")


@pytest.mark.parametrize("bad", [dict(size=33), dict(size=8), dict(num_frames=1), dict(videos_per_class=0)])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError, match="make_toy"):
        make_toy(tmp_path, **bad)
