"""Which frames of a video make up each clip: pure functions, no I/O.

Two rules, chosen by ``stride``:

* ``stride=None`` (uniform, the DINOv2 video protocol / TSN segment sampling): the
  video is cut into ``frames`` equal segments and each clip takes one frame per
  segment. View ``c`` of ``clips`` takes the point at fraction ``(c+1)/(clips+1)``
  of every segment, so ``clips=1`` takes segment centres and several views
  interleave::

      index[c, t] = floor((t + (c+1)/(clips+1)) * n / frames)

  e.g. n=10, frames=4, clips=1 -> [1, 3, 6, 8]; clips=2 -> [[0, 3, 5, 8], [1, 4, 6, 9]].
  A video shorter than ``frames`` is still sampled by the same formula, which then
  repeats frames: n=3, frames=4 -> [0, 1, 1, 2].

* ``stride=S`` (fixed step, V-JEPA style): a clip spans ``span = (frames-1)*S + 1``
  frames. ``clips=1`` is centred at ``start = floor((n - span) / 2)``; ``clips>1``
  spread their starts evenly from the first to the last valid start,
  ``start_c = floor(c * (n - span) / (clips - 1))``. A video shorter than ``span``
  gets every view centred (``start = floor((n - span) / 2)``, negative) and indices
  clamped to ``[0, n-1]``, i.e. the edge frames repeat, as V-JEPA pads short videos:
  n=10, frames=4, stride=2 -> [1, 3, 5, 7]; n=3, frames=4, stride=1 -> [0, 0, 1, 2].

``is_short`` says whether a video fell under the short-video rule, so extraction can
record it next to the features.
"""

from __future__ import annotations

import numpy as np


def _check(num_video_frames: int, frames: int, clips: int, stride: int | None) -> None:
    if num_video_frames <= 0:
        raise ValueError(f"num_video_frames must be positive, got {num_video_frames}: a video with no frames cannot be sampled")
    if frames <= 0:
        raise ValueError(f"frames must be positive (frames per clip, --frames), got {frames}")
    if clips <= 0:
        raise ValueError(f"clips must be positive (views per video, --clips), got {clips}")
    if stride is not None and stride <= 0:
        raise ValueError(f"stride must be positive or None for uniform sampling (--stride), got {stride}")


def clip_span(frames: int, stride: int | None) -> int:
    """Frames of video one clip needs without repeating any: ``frames`` for uniform sampling."""
    return frames if stride is None else (frames - 1) * stride + 1


def is_short(num_video_frames: int, frames: int, stride: int | None) -> bool:
    """True when the video has fewer frames than one clip needs, so frames repeat."""
    return num_video_frames < clip_span(frames, stride)


def uniform_indices(num_video_frames: int, frames: int, clips: int = 1) -> np.ndarray:
    """(clips, frames) int64 segment-sampled indices; see the module docstring."""
    _check(num_video_frames, frames, clips, None)
    n = num_video_frames
    t = np.arange(frames, dtype=np.int64)[None, :]
    c = np.arange(clips, dtype=np.int64)[:, None]
    # Integer arithmetic for floor((t + (c+1)/(clips+1)) * n / frames): floats would put
    # exact segment boundaries on the wrong side for some n.
    return ((t * (clips + 1) + c + 1) * n) // (frames * (clips + 1))


def strided_indices(num_video_frames: int, frames: int, stride: int, clips: int = 1) -> np.ndarray:
    """(clips, frames) int64 fixed-step indices; see the module docstring."""
    _check(num_video_frames, frames, clips, stride)
    n = num_video_frames
    span = clip_span(frames, stride)
    if n < span or clips == 1:
        starts = np.full(clips, (n - span) // 2, dtype=np.int64)
    else:
        starts = (np.arange(clips, dtype=np.int64) * (n - span)) // (clips - 1)
    idx = starts[:, None] + stride * np.arange(frames, dtype=np.int64)[None, :]
    return np.clip(idx, 0, n - 1)


def clip_frame_indices(num_video_frames: int, *, frames: int, clips: int = 1, stride: int | None = None) -> np.ndarray:
    """Frame numbers for each view of a video: (clips, frames) int64, sorted per view, in [0, n-1].

    ``stride=None`` samples ``frames`` evenly over the whole video; an int samples a
    fixed-step clip. Raises ValueError when ``num_video_frames <= 0``.
    """
    if stride is None:
        return uniform_indices(num_video_frames, frames, clips)
    return strided_indices(num_video_frames, frames, stride, clips)
