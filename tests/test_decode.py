import os
import signal
import time

import av
import numpy as np
import pytest
from conftest import coded_frames, read_frame_code

from spool.decode import DecodedVideo, DecodeError, DecodePool, read_video, resize_center_crop
from spool.sampling import clip_frame_indices
from spool.toy import write_video

# ------------------------------------------------------------------ resize_center_crop


def test_resize_center_crop_keeps_the_centre_of_a_landscape_frame():
    frame = np.zeros((40, 120, 3), np.uint8)
    frame[:, :40] = (255, 0, 0)
    frame[:, 40:80] = (0, 255, 0)
    frame[:, 80:] = (0, 0, 255)
    out = resize_center_crop(frame, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    # shorter side 40 -> 20, width 120 -> 60, centre crop = the green third
    np.testing.assert_array_equal(out[:, 2:-2], np.broadcast_to(np.array([0, 255, 0], np.uint8), (20, 16, 3)))


def test_resize_center_crop_portrait_and_upscale():
    frame = np.zeros((30, 10, 3), np.uint8)
    frame[10:20] = 200
    out = resize_center_crop(frame, 32)  # upscales: shorter side 10 -> 32, height 96, crop rows 32..64
    assert out.shape == (32, 32, 3)
    assert (out[4:-4] == 200).all()


def test_resize_center_crop_antialiases_when_shrinking():
    # A 1-pixel checkerboard averaged down must come out grey, not aliased stripes.
    frame = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    out = resize_center_crop(frame, 16)
    assert abs(out.astype(float).mean() - 127.5) < 3 and out.std() < 10


def test_resize_center_crop_is_identity_at_size():
    frame = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(frame, 24), frame)


# ------------------------------------------------------------------ read_video


SAMPLINGS = [dict(frames=8, clips=1, stride=None), dict(frames=8, clips=3, stride=None), dict(frames=6, clips=2, stride=3)]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_decodes_exactly_the_sampled_frames(tiny_mp4, decoder, sampling):
    video = read_video(tiny_mp4(40), size=32, decoder=decoder, **sampling)
    assert video.decoder == decoder and video.num_frames == 40 and video.fps == pytest.approx(25.0)
    expected = clip_frame_indices(40, **sampling)
    np.testing.assert_array_equal(video.frame_indices, expected)
    assert video.frames.shape == (sampling["clips"], sampling["frames"], 32, 32, 3) and video.frames.dtype == np.uint8
    codes = np.vectorize(lambda c, t: read_frame_code(video.frames[c, t]))(*np.indices(expected.shape))
    np.testing.assert_array_equal(codes, expected)
    assert not video.short


@pytest.mark.parametrize(("frames", "size"), [(40, (48, 64)), (25, (64, 48)), (17, 32)])
def test_decord_and_pyav_agree(tiny_mp4, frames, size):
    path = tiny_mp4(frames, size, lossless=False)
    a = read_video(path, frames=8, clips=2, size=24, decoder="decord")
    b = read_video(path, frames=8, clips=2, size=24, decoder="pyav")
    np.testing.assert_array_equal(a.frame_indices, b.frame_indices)
    assert a.num_frames == b.num_frames == frames
    # Both decoders convert YUV->RGB with FFmpeg's swscale and share resize_center_crop;
    # measured difference on these files: 0. Allow 1 grey level for a different swscale build.
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_short_video_repeats_frames(tiny_mp4, decoder):
    video = read_video(tiny_mp4(5), frames=8, stride=2, size=16, decoder=decoder)
    assert video.short and video.num_frames == 5
    np.testing.assert_array_equal(video.frame_indices, clip_frame_indices(5, frames=8, stride=2))
    codes = [read_frame_code(f) for f in video.frames[0]]
    assert codes == video.frame_indices[0].tolist()
    assert codes[0] == codes[1] == 0  # repeated edge frame, decoded once, copied
    np.testing.assert_array_equal(video.frames[0, 0], video.frames[0, 1])


@pytest.mark.parametrize(("codec", "ext"), [("libx264", "mkv"), ("mpeg4", "avi"), ("libvpx-vp9", "webm")])
def test_containers_without_a_frame_count(tiny_mp4, codec, ext):
    path = tiny_mp4(20, 32, codec=codec, ext=ext)
    a = read_video(path, frames=4, size=16, decoder="decord")
    b = read_video(path, frames=4, size=16, decoder="pyav")
    assert a.num_frames == b.num_frames == 20
    if codec != "mpeg4":  # no lossless mode: frame codes are not exact
        assert [read_frame_code(f) for f in b.frames[0]] == b.frame_indices[0].tolist()
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1


def _truncated_copy(src, dst, fraction):
    # faststart puts the index first, so the container still claims every frame
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory, tiny_mp4):
    d = tmp_path_factory.mktemp("broken")
    (d / "empty.mp4").write_bytes(b"")
    (d / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "folder.mp4").mkdir()
    faststart = write_video(d / "faststart.mp4", coded_frames(40, 48, 64), container_options={"movflags": "faststart"})
    _truncated_copy(faststart, d / "truncated.mp4", 0.7)
    # cut exactly before packet 25: every remaining packet is whole, only the header knows
    with av.open(str(faststart)) as c:
        cut = [p.pos for p in c.demux(c.streams.video[0]) if p.size][25]
    (d / "cut.mp4").write_bytes(faststart.read_bytes()[:cut])
    return d


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("missing.mp4", "missing file"),
        ("folder.mp4", "not a file"),
        ("empty.mp4", "empty file"),
        ("random.mp4", "not a video"),
        ("truncated.mp4", "truncated"),
        ("cut.mp4", "truncated: the container declares 40 frames, the file holds 25"),
    ],
)
def test_broken_files_raise_decode_error(broken_files, decoder, name, reason):
    with pytest.raises(DecodeError, match=reason) as info:
        read_video(broken_files / name, frames=8, size=16, decoder=decoder)
    assert "\n" not in str(info.value)
    if decoder == "decord" and name in ("random.mp4", "truncated.mp4", "cut.mp4"):
        assert "decord:" in str(info.value) and "pyav:" in str(info.value)  # both reasons


def test_unknown_decoder_names_the_option(tiny_mp4):
    with pytest.raises(ValueError, match="--decoder"):
        read_video(tiny_mp4(), frames=4, decoder="opencv")


# ------------------------------------------------------------------ DecodePool

# read_fn hooks: top-level so spawned workers can unpickle them


def hang_or_crash(path, **kwargs):
    name = os.path.basename(str(path))
    if name.startswith("hang"):
        time.sleep(60)
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("boom"):
        raise KeyError("a bug, not a bad video")
    return read_video(path, **kwargs)


def test_pool_returns_every_job_once(tiny_mp4, broken_files):
    good = tiny_mp4(40)
    jobs = [(i, good) for i in range(7)] + [("bad", broken_files / "random.mp4"), ("missing", broken_files / "missing.mp4")]
    with DecodePool(2, timeout_s=30, frames=4, size=16) as pool:
        results = dict(pool.imap_unordered(jobs))
    assert sorted(map(str, results)) == sorted(str(k) for k, _ in jobs)
    for i in range(7):
        assert isinstance(results[i], DecodedVideo) and results[i].frames.shape == (1, 4, 16, 16, 3)
    assert isinstance(results["bad"], DecodeError) and "not a video" in str(results["bad"])
    assert isinstance(results["missing"], DecodeError) and "missing file" in str(results["missing"])
    inline = dict(DecodePool(0, timeout_s=30, frames=4, size=16).imap_unordered(jobs))
    np.testing.assert_array_equal(inline[3].frames, results[3].frames)
    assert str(inline["bad"]) == str(results["bad"])


def test_pool_times_out_hung_and_survives_crashed_workers(tiny_mp4, tmp_path):
    good = tiny_mp4(40)
    jobs = [("hang", tmp_path / "hang.mp4"), ("crash", tmp_path / "crash.mp4"), ("boom", tmp_path / "boom.mp4")] + [(i, good) for i in range(4)]
    start = time.monotonic()
    with DecodePool(2, timeout_s=1.0, read_fn=hang_or_crash, frames=4, size=16) as pool:
        results = dict(pool.imap_unordered(jobs))
    assert time.monotonic() - start < 15
    assert set(results) == {"hang", "crash", "boom", 0, 1, 2, 3}
    assert str(results["hang"]) == "timed out after 1s"
    assert str(results["boom"]) == "unexpected KeyError: 'a bug, not a bad video'"
    assert isinstance(results["crash"], DecodeError) and str(results["crash"]).startswith("decoder crashed")
    assert all(isinstance(results[i], DecodedVideo) for i in range(4))


def test_pool_keeps_few_videos_in_flight(tiny_mp4):
    pulled = []

    def jobs():
        for i in range(20):
            pulled.append(i)
            yield i, tiny_mp4(40)

    with DecodePool(2, timeout_s=30, frames=2, size=16) as pool:
        stream = pool.imap_unordered(jobs())
        next(stream)
        time.sleep(1.0)  # let the workers run ahead as far as they may
        # bounded memory: 2 decoding + 2 finished + 1 waiting to be queued + 1 held by us
        assert len(pulled) <= 2 * 2 + 2
        assert len(list(stream)) == 19


def test_pool_stops_cleanly_when_the_caller_stops_early(tiny_mp4):
    start = time.monotonic()
    with DecodePool(2, timeout_s=30, frames=2, size=16) as pool:
        for _ in pool.imap_unordered((i, tiny_mp4(40)) for i in range(100)):
            break
        held = pool.imap_unordered((i, tiny_mp4(40)) for i in range(100))
        next(held)  # still referenced when the pool closes
    assert time.monotonic() - start < 10
    assert pool._workers == [] and pool._schedulers == []


def test_decord_failure_falls_back_to_pyav(tiny_mp4, monkeypatch):
    import spool.decode

    def broken(*args):
        raise RuntimeError("decord exploded")

    monkeypatch.setattr(spool.decode, "_read_decord", broken)
    video = read_video(tiny_mp4(40), frames=4, size=16, decoder="decord")
    assert video.decoder == "pyav" and video.num_frames == 40


# ------------------------------------------------------------------ the evaluation transform


@pytest.mark.parametrize("shape", [(480, 640), (360, 203), (97, 131), (256, 256)])
@pytest.mark.parametrize("size,crop_pct", [(224, 0.875), (112, 0.875), (98, 1.0)])
def test_frame_transform_equals_torchvision_resize_and_center_crop(shape, size, crop_pct):
    from PIL import Image
    from torchvision import transforms

    from spool.decode import FrameTransform

    rng = np.random.default_rng(0)
    # smooth content plus noise, so a one-pixel offset or another filter shows
    base = rng.integers(0, 256, size=(shape[0] // 8 + 1, shape[1] // 8 + 1, 3), dtype=np.uint8)
    frame = np.asarray(Image.fromarray(base).resize(shape[::-1], Image.Resampling.BILINEAR))
    frame = np.clip(frame.astype(int) + rng.integers(-20, 20, size=frame.shape), 0, 255).astype(np.uint8)
    reference = transforms.Compose([
        transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
    ])(Image.fromarray(frame))
    ours = FrameTransform(size, crop_pct, "bicubic")(frame)
    assert ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, np.asarray(reference))


def test_the_default_transform_is_dinov2s_evaluation_transform(tiny_mp4):
    """read_video's frames equal torchvision's Resize(size * 8 / 7, bicubic) + CenterCrop(size) on the decoded frame."""
    import av
    from PIL import Image
    from torchvision import transforms

    path = tiny_mp4(frames=12, size=(120, 160))
    decoded = read_video(path, frames=4, size=56, decoder="pyav")  # defaults: crop_pct 0.875, bicubic
    reference = transforms.Compose([transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(56)])
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for clip_pos, idx in enumerate(decoded.frame_indices[0]):
        expected = np.asarray(reference(Image.fromarray(frames[int(idx)])))
        np.testing.assert_array_equal(decoded.frames[0, clip_pos], expected)


def test_bad_crop_pct_and_interpolation_are_refused():
    from spool.decode import FrameTransform

    with pytest.raises(ValueError, match="--crop-pct"):
        FrameTransform(224, 1.5)
    with pytest.raises(ValueError, match="--interpolation"):
        FrameTransform(224, 0.875, "lanczos")


@pytest.mark.slow
def test_native_decoder_chatter_is_silenced_and_reasons_are_plain(tmp_path, tiny_mp4):
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    good = tiny_mp4(frames=8)
    shutil.copy(good, src / "a" / "ok.mp4")
    (src / "a" / "cut.mp4").write_bytes(good.read_bytes()[:300])  # index gone: "moov atom not found"
    (src / "a" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    for workers in ("1", "0"):
        out = tmp_path / f"s{workers}.zarr"
        run = subprocess.run(
            [sys.executable, "-m", "spool", "extract", str(src), "--out", str(out), "--weights", "random",
             "--size", "28", "--frames", "2", "--workers", workers],
            capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert "moov atom" not in run.stderr and "video_reader.cc" not in run.stderr, run.stderr
        assert "ERROR opening" not in run.stderr and "Errno" not in run.stderr, run.stderr
        assert "failed a/cut.mp4" in run.stderr  # the reason is still said, once
        from spool.stores import open_store

        with open_store(out) as store:
            errors = [e for e in store.videos().error if e]
        assert len(errors) == 2 and all("Invalid data found when processing input" in e for e in errors), errors


def test_an_error_in_the_middle_of_decoding_is_said_without_errno_and_path(tiny_mp4, monkeypatch):
    import av

    path = tiny_mp4(frames=8)
    real_open = av.open

    class BreaksAfterTwoFrames:  # a container whose third frame FFmpeg cannot decode
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def decode(self, stream):
            for i, frame in enumerate(self.container.decode(stream)):
                if i == 2:
                    raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input", str(path))
                yield frame

    monkeypatch.setattr(av, "open", lambda *a, **k: BreaksAfterTwoFrames(real_open(*a, **k)))
    with pytest.raises(DecodeError) as err:
        read_video(path, frames=8, size=16, decoder="pyav")
    reason = str(err.value)
    assert reason == "truncated or corrupt: decoded 2 of 8 frames, then Invalid data found when processing input"
