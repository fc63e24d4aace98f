"""A tiny synthetic dataset that only a model of temporal order can solve.

Classes come in pairs that are time-reversals of each other (``TOY_PAIRS``). Every
video of the first class of a pair is generated from random parameters (colour,
size, path, background noise) and its twin in the second class is *exactly* the same
frames in reverse order. The set of frames of a pair is therefore identical, so any
model that averages over frames (mean pooling, a bag of frames) is at chance by
construction, while a model that looks at order can reach 100%.

Videos are real H.264 MP4 files (yuv420p, lossless, written with PyAV), laid out one
folder per class, so ``spool.sources.load_source(out_dir)`` reads them as a folder
dataset. Lossless coding keeps the twin property after decoding: a decoded video is
exactly its twin's decoded frames reversed, and a seed always gives the same pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import av
import numpy as np

# (forward class, its time-reversal)
TOY_PAIRS: tuple[tuple[str, str], ...] = (
    ("moving_right", "moving_left"),
    ("growing", "shrinking"),
    ("appearing", "disappearing"),
)
TOY_CLASSES: tuple[str, ...] = tuple(name for pair in TOY_PAIRS for name in pair)


def write_video(path: Path, frames: np.ndarray, *, fps: int = 25, codec: str = "libx264", pix_fmt: str = "yuv420p", options: dict[str, str] | None = None, container_options: dict[str, str] | None = None) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames into ``path`` with PyAV; the container follows the suffix.

    ``options`` go to the encoder (``{"crf": "18"}``), ``container_options`` to the muxer
    (``{"movflags": "faststart"}``).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video: frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise ValueError(f"write_video: yuv420p needs even height and width, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        # One encoder thread: frame-threaded x264 is slower than one thread on tiny clips.
        stream.thread_count = 1
        for i, frame in enumerate(frames):
            # Converting to the stream's pixel format here and numbering frames ourselves
            # makes the bytes reproducible: left to the encoder, identical input sometimes
            # gave different files.
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format=pix_fmt)
            video_frame.pts = i
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def _square_frames(num_frames: int, size: int, rng: np.random.Generator, motion: str) -> np.ndarray:
    """(T, size, size, 3) uint8 frames of the forward class ``motion`` of a pair."""
    # Smooth, low-contrast background noise: gives the codec and the backbone texture
    # without making the videos expensive to encode.
    coarse = rng.uniform(60, 110, size=(size // 8 + 1, size // 8 + 1, 3))
    background = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size]
    colour = rng.uniform(150, 255, size=3) * rng.permutation([1.0, 0.6, 0.2])
    side = int(rng.integers(size // 6, size // 3))
    y0 = int(rng.integers(0, size - side))
    t = np.linspace(0.0, 1.0, num_frames)
    frames = np.repeat(background[None], num_frames, axis=0)
    for i, s in enumerate(t):
        # centre (cx, cy), half side and opacity of the square at time s in [0, 1]
        if motion == "moving_right":
            cx, cy, half, alpha = side / 2 + s * (size - side), y0 + side / 2, side / 2, 1.0
        elif motion == "growing":
            cx, cy, half, alpha = size / 2, size / 2, (0.2 + 0.8 * s) * side, 1.0
        elif motion == "appearing":
            cx, cy, half, alpha = size / 2, y0 + side / 2, side / 2, s
        else:
            raise ValueError(f"unknown toy motion {motion!r}; expected one of {[p[0] for p in TOY_PAIRS]}")
        top, bottom = max(int(round(cy - half)), 0), max(int(round(cy + half)), 0)
        left, right = max(int(round(cx - half)), 0), max(int(round(cx + half)), 0)
        region = frames[i, top:bottom, left:right]
        region[:] = (1 - alpha) * region + alpha * colour
    return np.clip(frames, 0, 255).astype(np.uint8)


def toy_pair_frames(num_frames: int, size: int, seed: int, pair: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The frames of video ``index`` of both classes of ``TOY_PAIRS[pair]``: (forward, reversed).

    Deterministic in (seed, pair, index), so a single video can be regenerated without
    the rest of the dataset; the second array is exactly the first reversed in time.
    """
    rng = np.random.default_rng([seed, pair, index])
    forward = _square_frames(num_frames, size, rng, TOY_PAIRS[pair][0])
    return forward, forward[::-1].copy()


def make_toy(out_dir: Path, *, videos_per_class: int = 8, num_frames: int = 16, size: int = 64, seed: int = 0, progress: Callable[[Path], None] | None = None) -> list[Path]:
    """Write the toy dataset under ``out_dir/<class>/<class>_<i>.mp4`` and return the files written.

    Load it with ``spool.sources.load_source(out_dir)``. ``progress`` is called once per file.
    """
    if size < 16 or size % 2:
        raise ValueError(f"make_toy: size must be an even number >= 16 (H.264 yuv420p), got {size}")
    if num_frames < 2:
        raise ValueError(f"make_toy: num_frames must be >= 2 for time order to mean anything, got {num_frames}")
    if videos_per_class < 1:
        raise ValueError(f"make_toy: videos_per_class must be >= 1, got {videos_per_class}")
    out_dir = Path(out_dir)
    written = []
    for p, (name_a, name_b) in enumerate(TOY_PAIRS):
        for i in range(videos_per_class):
            forward, backward = toy_pair_frames(num_frames, size, seed, p, i)
            for name, frames in ((name_a, forward), (name_b, backward)):
                # Lossless (qp 0): decoded frames are the generated frames after the RGB->YUV420
                # round trip, which acts on each frame alone, so decoded twins are exact
                # reversals and the pixels do not depend on the encoder's choices.
                path = write_video(out_dir / name / f"{name}_{i:03d}.mp4", frames, options={"qp": "0"})
                written.append(path)
                if progress is not None:
                    progress(path)
    return written
