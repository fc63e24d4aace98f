"""Shared fixtures: tiny real videos written with PyAV once per test session.

``tiny_mp4(frames=40, size=(48, 64), lossless=True)`` returns the path of a cached video whose
frame ``i`` carries its own number: the top band is flat grey ``frame_code(i)``,
so ``read_frame_code(frame)`` tells which frame a decoder returned (after resize
and centre crop too, for landscape sizes). Copy the file before changing it.

``toy_videos`` is a small ``spool.toy.make_toy`` dataset directory (6 classes x 4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spool.toy import make_toy, write_video

CODE_STEP = 5  # grey levels between consecutive frame codes; H.264 keeps flat areas within ~1


LOSSLESS = {"libx264": {"qp": "0"}, "libvpx-vp9": {"lossless": "1"}}


def frame_code(i: int) -> int:
    return 10 + CODE_STEP * (i % 48)


def read_frame_code(frame: np.ndarray) -> int:
    """The frame number written by ``coded_frames``, read back from a decoded (H, W, 3) frame."""
    band = frame[: max(frame.shape[0] // 8, 1), frame.shape[1] // 4 : 3 * frame.shape[1] // 4]
    return int(round((float(band.mean()) - 10) / CODE_STEP))


def coded_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8: top quarter flat grey frame_code(t), below a moving coloured square on noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((frames, height, width, 3), np.uint8)
    background = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    side = max(height // 4, 2)
    for t in range(frames):
        out[t] = background
        out[t, : height // 4] = frame_code(t)
        x = (t * 3) % max(width - side, 1)
        out[t, height // 2 : height // 2 + side, x : x + side] = (250, 40, 40)
    return out


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def tiny_mp4(video_dir):
    """Factory: ``tiny_mp4(frames=40, size=(48, 64), fps=25, codec="libx264", ext="mp4", lossless=True) -> Path`` (cached)."""
    cache: dict[tuple, Path] = {}

    def make(frames: int = 40, size: int | tuple[int, int] = (48, 64), *, fps: int = 25, codec: str = "libx264", ext: str = "mp4", lossless: bool = True) -> Path:
        height, width = (size, size) if isinstance(size, int) else size
        key = (frames, height, width, fps, codec, ext, lossless)
        if key not in cache:
            # Lossless keeps the frame codes exact (lossy H.264 shifts a flat band by up
            # to ~5 grey levels near the end of a GOP); lossless=False gives an ordinary
            # x264 file with B-frames, as found in the wild.
            options = LOSSLESS.get(codec, {}) if lossless else {}
            path = video_dir / f"coded_{frames}f_{height}x{width}_{fps}fps_{codec}_{'lossless' if lossless else 'lossy'}.{ext}"
            cache[key] = write_video(path, coded_frames(frames, height, width), fps=fps, codec=codec, options=options)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def toy_videos(tmp_path_factory) -> Path:
    """A make_toy dataset: <dir>/<class>/<class>_NNN.mp4, 6 classes x 4 videos, 16 frames of 32x32."""
    root = tmp_path_factory.mktemp("toy")
    make_toy(root, videos_per_class=4, num_frames=16, size=32, seed=0)
    return root


REAL_DINOV2_BUILD = Path(__file__).resolve().parents[1].parent / "shared" / "real-dinov2" / "build.sh"


@pytest.fixture(scope="session")
def real_dinov2() -> Path:
    """The folder with a trained DINOv2 ViT-S/14 (official and Hugging Face layouts), built once per
    machine by ../shared/real-dinov2/build.sh (about a minute, needs the package registry).

    A folder that already holds it (``SPOOL_REAL_DINOV2``, or build.sh's default) is used as is. Without it the tests that
    need trained weights fail: random weights cannot stand in for them.
    """
    import os
    import subprocess

    # build.sh's own folder ($SPOOL_REAL_DINOV2, else /tmp/spool-real-dinov2) may hold it already
    folder = Path(os.environ.get("SPOOL_REAL_DINOV2") or "/tmp/spool-real-dinov2")
    if (folder / "dinov2_vits14_real.safetensors").is_file():
        return folder
    if not REAL_DINOV2_BUILD.is_file():
        pytest.fail(f"trained DINOv2 weights needed: {REAL_DINOV2_BUILD} not found and SPOOL_REAL_DINOV2 not set")
    out = subprocess.run(["bash", str(REAL_DINOV2_BUILD)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"{REAL_DINOV2_BUILD} failed: {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])
