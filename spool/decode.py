"""Decode the sampled frames of a video, resized and centre-cropped, with decord or PyAV.

``read_video`` counts a video's frames, picks the clip frame numbers with
``spool.sampling.clip_frame_indices`` and decodes only those frames, shrinking each
one as soon as it is decoded, so a long 4K file never holds more than the sampled,
already-small frames in memory. Both decoders go through the same resize
(``FrameTransform``: by default DINOv2's evaluation transform, bicubic), so they return the same
pixels on ordinary files (both convert YUV to RGB with FFmpeg's swscale).

Frame numbers are positions in presentation order, counted from 0. A video's length
is the number of video packets in the file (what decord counts when it opens a file;
PyAV demuxes without decoding to get the same number). A file whose header declares
more frames than it holds, or whose decoding ends before a sampled frame, fails with
``DecodeError("truncated: ...")``; it is never padded or resampled silently.

``DecodePool`` runs ``read_video`` in worker processes with a per-video time limit,
because a decoder can hang or crash in native code, which no ``try`` can catch.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

import numpy as np
from PIL import Image

from spool.sampling import clip_frame_indices, is_short

DECODERS = ("decord", "pyav")


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # (clips, T, size, size, 3) uint8 RGB
    frame_indices: np.ndarray  # (clips, T) int64
    num_frames: int
    fps: float
    decoder: str  # the decoder that produced the frames ("pyav" after a decord fallback)
    short: bool  # fewer frames than one clip needs: frames repeat (see spool.sampling)


class DecodeError(Exception):
    """A video that cannot be decoded; ``str(err)`` is a one-line reason fit for a failure table."""


INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class FrameTransform:
    """Shorter side to ``floor(size / crop_pct)``, then a centre crop of ``size`` (timm's names).

    The default is DINOv2's evaluation transform (and V-JEPA's frozen evaluation of image
    models): bicubic resize to 256, centre crop 224. Sizes and offsets follow torchvision's
    ``Resize(int)`` + ``CenterCrop``, so the crops equal theirs pixel for pixel; PIL's filters
    widen when shrinking (antialiasing), as torchvision's do on PIL images.
    ``crop_pct=1.0, interpolation="bilinear"`` is Spool's transform before 0.2.
    """

    size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def resize_size(self) -> int:
        return math.floor(self.size / self.crop_pct)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (size, size, 3) uint8."""
        h, w = frame.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)  # torchvision's rounding
        new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
        if (new_h, new_w) != (h, w):
            frame = np.asarray(Image.fromarray(frame).resize((new_w, new_h), INTERPOLATIONS[self.interpolation]))
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return np.ascontiguousarray(frame[top : top + self.size, left : left + self.size])


def resize_center_crop(frame: np.ndarray, size: int, crop_pct: float = 1.0, interpolation: str = "bilinear") -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 through ``FrameTransform``."""
    return FrameTransform(size, crop_pct, interpolation)(frame)


def _check_file(path: Path) -> None:
    # Checked before any decoder sees the file: decord reports all of these as a bare
    # "Error reading", and an empty file is one of the inputs native decoders mishandle.
    if not path.exists():
        raise DecodeError(f"missing file: {path}")
    if not path.is_file():
        raise DecodeError(f"not a file (a directory?): {path}")
    if path.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:  # permissions, I/O errors: otherwise reported by PyAV as "not a video"
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise DecodeError(f"cannot read file: {err.strerror or _one_line(err)}") from err


_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _av_reason(err: BaseException) -> str:
    """FFmpeg's own words ("Invalid data found when processing input"), without PyAV's
    "[Errno 1094995529]" (an AVERROR tag read as a number) and the path the table already names."""
    return _one_line(Exception(getattr(err, "strerror", None) or err))


def _assemble(decoded: dict[int, np.ndarray], indices: np.ndarray, size: int) -> np.ndarray:
    """(clips, T, size, size, 3) from the unique decoded frames; repeated indices share a frame."""
    out = np.empty((*indices.shape, size, size, 3), np.uint8)
    for pos, idx in np.ndenumerate(indices):
        out[pos] = decoded[int(idx)]
    return out


def _read_decord(path: Path, frames: int, clips: int, stride: int | None, transform: FrameTransform) -> DecodedVideo:
    import decord  # imported here so PyAV-only installs (decord has no aarch64 wheel) still work

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    if n <= 0:
        raise DecodeError("zero frames")
    try:
        declared = _declared_frames(path)
    except Exception:  # PyAV cannot read the header: nothing to compare against
        declared = 0
    _check_complete(declared, n)
    indices = clip_frame_indices(n, frames=frames, clips=clips, stride=stride)
    wanted = np.unique(indices).tolist()
    decoded: dict[int, np.ndarray] = {}
    # Small batches: get_batch returns full-resolution frames, so shrink them before
    # asking for more (a 4K frame is 25 MB).
    for start in range(0, len(wanted), 8):
        chunk = wanted[start : start + 8]
        batch = vr.get_batch(chunk).asnumpy()
        if batch.shape[-1] != 3:  # decord's 180-degree rotation returns 4 garbled channels
            raise DecodeError(f"decord returned {batch.shape[-1]}-channel frames (a rotated video?)")
        for idx, frame in zip(chunk, batch):
            decoded[idx] = transform(frame)
    return DecodedVideo(_assemble(decoded, indices, transform.size), indices, n, float(vr.get_avg_fps()), "decord", is_short(n, frames, stride))


def count_frames(path: Path) -> tuple[int, int]:
    """(declared, present): the frame count the container header claims (0 if it has none)
    and the video packets actually in the file, counted by demuxing without decoding.

    ``present`` is the count decord uses (it indexes every packet when it opens a file),
    so both decoders sample from the same length.
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DecodeError("not a video: no video stream")
        stream = container.streams.video[0]
        declared = max(int(stream.frames), 0)
        present = sum(1 for packet in container.demux(stream) if packet.size > 0)
    return declared, present


def _declared_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return max(int(container.streams.video[0].frames), 0) if container.streams.video else 0


def _check_complete(declared: int, present: int) -> None:
    # A file cut short keeps its header (MP4 with the index first), and decord then
    # quietly samples from the frames that remain; say so instead.
    if declared > present:
        raise DecodeError(f"truncated: the container declares {declared} frames, the file holds {present}")


def _read_pyav(path: Path, frames: int, clips: int, stride: int | None, transform: FrameTransform) -> DecodedVideo:
    import av

    try:
        declared, n = count_frames(path)
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise DecodeError(f"not a video: {_av_reason(err)}") from err
    if n <= 0:
        container.close()
        raise DecodeError("zero frames")
    _check_complete(declared, n)
    with container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        indices = clip_frame_indices(n, frames=frames, clips=clips, stride=stride)
        wanted = set(np.unique(indices).tolist())
        last = max(wanted)
        stream.thread_type = "AUTO"
        decoded: dict[int, np.ndarray] = {}
        count = 0
        # Sequential decode: exact frame numbers without trusting seek accuracy. Only the
        # sampled frames are converted to RGB and kept; decoding stops after the last one.
        try:
            for count, frame in enumerate(container.decode(stream), start=1):
                idx = count - 1
                if idx in wanted:
                    # Display orientation, as decord gives it: turn by the container's rotation.
                    rgb = np.rot90(frame.to_ndarray(format="rgb24"), (frame.rotation // 90) % 4)
                    decoded[idx] = transform(np.ascontiguousarray(rgb))
                if idx >= last:
                    break
        except av.FFmpegError as err:
            raise DecodeError(f"truncated or corrupt: decoded {count} of {n} frames, then {_av_reason(err)}") from err
    if len(decoded) < len(wanted):
        raise DecodeError(f"truncated: decoded {count} of {n} frames")
    return DecodedVideo(_assemble(decoded, indices, transform.size), indices, n, fps, "pyav", is_short(n, frames, stride))


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null inside the block. FFmpeg and decord write their
    complaints ("moov atom not found", decord's "ERROR opening: <path>") straight to the
    descriptor, past Python; the reason is recorded in the store, so the chatter is noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def read_video(
    path: Path | str,
    *,
    frames: int,
    clips: int = 1,
    stride: int | None = None,
    size: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    decoder: str = "decord",
) -> DecodedVideo:
    """Decode the sampled frames of one video; raise DecodeError with a one-line reason if it cannot.

    Each frame goes through ``FrameTransform(size, crop_pct, interpolation)``.
    ``decoder="decord"`` falls back to PyAV when decord raises; ``"pyav"`` uses PyAV only.
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r} (--decoder); expected one of {DECODERS}")
    path = Path(path)
    transform = FrameTransform(size, crop_pct, interpolation)
    _check_file(path)
    if decoder == "decord":
        try:
            return _read_decord(path, frames, clips, stride, transform)
        except DecodeError as err:
            decord_reason = str(err)
        except Exception as err:  # decord raises bare RuntimeErrors/DECORDErrors for bad data
            # drop decord's "[12:34:56] /src/.../video_reader.cc:151: " log prefix: a clock time
            # in the reason would make two extractions of the same files differ
            decord_reason = _one_line(Exception(_DECORD_PREFIX.sub("", str(err))))
        try:
            return _read_pyav(path, frames, clips, stride, transform)
        except Exception as err:
            raise DecodeError(f"decord: {decord_reason}; pyav: {_one_line(err)}") from err
    try:
        return _read_pyav(path, frames, clips, stride, transform)
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(f"pyav: {_one_line(err)}") from err


# ----------------------------------------------------------------------------- pool


def _worker_main(conn: multiprocessing.connection.Connection, read_fn: Callable[..., DecodedVideo], kwargs: dict[str, Any]) -> None:
    """Worker process: decode jobs from ``conn`` one at a time until it receives None."""
    # Ctrl-C reaches the whole process group; the parent shuts the workers down. A worker
    # killed by it would otherwise be reported as "decoder crashed" and its video marked failed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(("ready", None, None))
    # From here on every outcome reaches the parent through ``conn`` (a crash as the exit code),
    # so the native decoders' stderr chatter is dropped for good (see native_stderr_silenced).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    while True:
        job = conn.recv()
        if job is None:
            return
        key, path = job
        try:
            result: DecodedVideo | DecodeError = read_fn(path, **kwargs)
        except DecodeError as err:
            result = err
        except Exception as err:  # the boundary where a bad video is recorded and skipped
            result = DecodeError(f"unexpected {type(err).__name__}: {_one_line(err)}")
        conn.send(("done", key, result))


class _Worker:
    def __init__(self, ctx: Any, read_fn: Callable[..., DecodedVideo], kwargs: dict[str, Any]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, read_fn, kwargs), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.job: tuple[Hashable, Path] | None = None
        self.deadline = float("inf")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class DecodePool:
    """Decode videos in worker processes, each video with a time limit.

    ``DecodePool(num_workers, timeout_s, frames=16, size=224, ...)`` passes the remaining
    keyword arguments to ``read_fn`` (``read_video`` unless given; it must be a
    top-level, picklable function). Each worker decodes one video at a time and at most
    ``num_workers`` finished videos wait for the caller, so about ``2 * num_workers``
    decoded videos are held at once however long the job list is. A worker that runs past ``timeout_s`` on one video is killed and replaced
    (result ``DecodeError("timed out after ...")``); one that dies yields
    ``DecodeError("decoder crashed ...")`` and is replaced. ``num_workers=0`` decodes
    inline, without a time limit, and lets unexpected exceptions through for debugging.
    """

    def __init__(self, num_workers: int, timeout_s: float, *, read_fn: Callable[..., DecodedVideo] = read_video, mp_context: str = "spawn", **read_kwargs: Any):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (--workers), got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (--decode-timeout), got {timeout_s}")
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self.read_fn, self.read_kwargs = read_fn, read_kwargs
        # spawn (not fork): a forked copy of a process that has started torch's thread
        # pools can deadlock; spawn starts clean workers that import only what decoding needs.
        self._ctx = mp.get_context(mp_context)
        self._workers: list[_Worker] = []
        self._schedulers: list[tuple[threading.Event, threading.Thread]] = []

    def __enter__(self) -> DecodePool:
        self._workers = [self._start_worker() for _ in range(self.num_workers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start_worker(self) -> _Worker:
        return _Worker(self._ctx, self.read_fn, self.read_kwargs)

    def close(self) -> None:
        # a caller that left the `with` block holding an unfinished iterator: stop its
        # scheduler before the workers it drives go away
        for stop, thread in self._schedulers:
            stop.set()
            thread.join()
        self._schedulers = []
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(2)
            if worker.process.is_alive():
                worker.kill()
            else:
                worker.conn.close()
        self._workers = []

    def imap_unordered(self, jobs: Iterable[tuple[Hashable, Path]]) -> Iterator[tuple[Hashable, DecodedVideo | DecodeError]]:
        """Yield ``(key, DecodedVideo or DecodeError)`` once per job, in completion order."""
        if self.num_workers == 0:
            for key, path in jobs:
                try:
                    with native_stderr_silenced():
                        decoded = self.read_fn(path, **self.read_kwargs)
                except DecodeError as err:
                    decoded = err
                yield key, decoded
            return
        if not self._workers:
            raise RuntimeError("DecodePool.imap_unordered with workers must run inside `with DecodePool(...) as pool:`")
        # A thread schedules the workers so they keep decoding while the caller is busy
        # with the previous video (the backbone); the bounded queue caps memory at about
        # 2 * num_workers videos: one decoding in each worker, num_workers finished.
        results: queue.Queue = queue.Queue(maxsize=self.num_workers)
        stop = threading.Event()

        def schedule() -> None:
            try:
                for item in self._schedule(jobs, stop):
                    while not stop.is_set():
                        try:
                            results.put(("item", item), timeout=0.2)
                            break
                        except queue.Full:
                            pass
                    if stop.is_set():
                        return
                results.put(("end", None))
            except BaseException as err:  # re-raised in the caller's thread
                results.put(("error", err))

        thread = threading.Thread(target=schedule, name="spool-decode-scheduler", daemon=True)
        self._schedulers.append((stop, thread))
        thread.start()
        try:
            while True:
                kind, payload = results.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise payload
                yield payload
        finally:
            stop.set()
            thread.join()

    def _schedule(self, jobs: Iterable[tuple[Hashable, Path]], stop: threading.Event) -> Iterator[tuple[Hashable, DecodedVideo | DecodeError]]:
        """Hand jobs to idle workers, collect results, kill and replace hung or dead workers."""
        pending = iter(jobs)
        exhausted = False
        while not stop.is_set():
            for worker in self._workers:
                if worker.ready and worker.job is None and not exhausted:
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                    else:
                        worker.job, worker.deadline = job, time.monotonic() + self.timeout_s
                        worker.conn.send(job)
            if exhausted and all(w.job is None for w in self._workers):
                return
            wait_s = max(0.0, min(w.deadline for w in self._workers) - time.monotonic())
            handles = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
            # short cap: the stop flag is checked between waits
            ready = set(mp.connection.wait(handles, timeout=min(wait_s, 0.5)))
            for i, worker in enumerate(list(self._workers)):
                kind = None
                if worker.conn in ready:
                    try:
                        kind, key, result = worker.conn.recv()
                    except (EOFError, OSError):
                        kind = "dead"
                    if kind == "ready":
                        worker.ready = True
                        continue
                    if kind == "done":
                        worker.job, worker.deadline = None, float("inf")
                        yield key, result
                        continue
                elif worker.conn.poll():
                    continue  # a message arrived after wait() returned: read it before judging the worker
                if kind == "dead" or worker.process.sentinel in ready or not worker.process.is_alive():
                    worker.process.join(5)
                    code = worker.process.exitcode
                    if not worker.ready:
                        raise RuntimeError(f"a decode worker exited with code {code} before it started; run with --workers 0 to see the error in this process")
                    job = worker.job
                    worker.kill()
                    self._workers[i] = self._start_worker()
                    if job is not None:
                        yield job[0], DecodeError(f"decoder crashed (worker exit code {code})")
                    continue
                if worker.job is not None and time.monotonic() > worker.deadline:
                    key = worker.job[0]
                    worker.kill()
                    self._workers[i] = self._start_worker()
                    yield key, DecodeError(f"timed out after {self.timeout_s:g}s")
