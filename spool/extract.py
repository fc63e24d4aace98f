"""Stage one: decode each video once, run the frozen backbone, write a resumable feature cache.

Three things overlap so the backbone never waits: decoding in worker processes
(`DecodePool`), the backbone on fixed-size frame batches in this process, and a
background thread that writes finished videos into the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

import numpy as np
import torch

from spool.backbone import (
    FrameEncoder, WeightsIdentity, check_backbone_options, check_pretrained_available, load_backbone, normalize_frames,
    timm_name,
)  # fmt: skip
from spool.decode import DecodedVideo, DecodeError, DecodePool, FrameTransform
from spool.device import resolve_device
from spool.ddp import Ranks, process_group
from spool.distributed import Shard, TorchrunEnv, rank_device
from spool.progress import RateProgress
from spool.sources import VideoSource, load_source
from spool.stores import COMMIT_INTERVAL_S, StoreError, backend_for, create_store, open_store
from spool.stores.base import DONE, FAILED, NO_SPLIT, PENDING, SPLIT_CODES, StoreBusyError
from spool.stores.shards import (
    ShardReport, ShardWriter, recorded_status, shard_report, shard_videos, wait_for_shards,
)  # fmt: skip


@dataclass(frozen=True)
class ExtractConfig:
    source: str
    out: str
    format: str = "auto"
    split_files: tuple[str, ...] = ()
    labels_file: str | None = None
    backbone: str = "dinov2_vits14"
    weights: str = "pretrained"  # "pretrained" | "random" | a checkpoint path
    image_size: int = 224
    crop_pct: float = 0.875  # shorter side to floor(image_size / crop_pct), centre crop (spool.decode.FrameTransform)
    interpolation: str = "bicubic"
    token_pool: int = 1
    frames: int = 16  # T
    stride: int | None = None  # None: T frames evenly spaced over the video
    clips: int = 1  # temporal views per video
    decoder: str = "decord"  # decord (PyAV as fallback) | pyav
    workers: int | None = None  # decoding processes; 0 decodes inline; None: default_workers(device, cores)
    decode_timeout: float = 120.0  # seconds per video before its decoder is killed
    batch_size: int = 64  # frames per backbone call
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    retry_failed: bool = False
    shard: Shard = Shard()  # this process's share of the videos (--shard i/n, or torchrun's rank)

    def __post_init__(self) -> None:
        checks = [
            (self.frames >= 1, f"--frames must be >= 1, got {self.frames}"),
            (self.clips >= 1, f"--clips must be >= 1, got {self.clips}"),
            (self.stride is None or self.stride >= 1, f"--stride must be >= 1, got {self.stride}"),
            (self.image_size >= 14, f"--size must be >= 14, got {self.image_size}"),
            (self.token_pool >= 1, f"--token-pool must be >= 1, got {self.token_pool}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.workers is None or self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.decode_timeout > 0, f"--decode-timeout must be > 0, got {self.decode_timeout}"),
            (self.decoder in ("decord", "pyav"), f"--decoder must be decord or pyav, got {self.decoder!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        FrameTransform(self.image_size, self.crop_pct, self.interpolation)  # checks --crop-pct, --interpolation
        try:  # --out feats.npy: refused here, not after the backbone is built
            backend_for(self.out)
        except StoreError as err:
            raise ValueError(f"--out {err}") from None
        if self.overwrite and not self.shard.whole:
            # A late shard (or a torchrun restart) would wipe what the others wrote.
            raise ValueError(
                "--overwrite cannot be combined with a sharded run (--shard or torchrun): a late shard would wipe "
                "what the others wrote. Delete the store first, then start the shards"
            )


# How the run was spread over processes, not what it computes: left out of the store's attrs,
# so a sharded store equals a single-process one.
EXECUTION_KEYS = ("shard",)


# The options that decide what the store's numbers are. Re-running with a different value
# on an existing store would mix two kinds of features, so it is refused.
CONTENT_KEYS = (
    "backbone", "timm_name", "weights", "image_size", "crop_pct", "interpolation", "token_pool", "frames", "stride",
    "clips", "decoder",
)  # fmt: skip
# ... as `spool extract`'s options, for messages (the others are "--" + the key)
CONTENT_OPTIONS = {
    "timm_name": "--backbone (its timm name)", "image_size": "--size", "crop_pct": "--crop-pct",
    "token_pool": "--token-pool",
}  # fmt: skip


@dataclass
class ExtractResult:
    store: str
    done: int = 0  # videos extracted by this run
    failed: int = 0  # videos that failed in this run
    skipped: int = 0  # videos already finished before this run
    total_done: int = 0  # DONE videos in the store after this run
    seconds: float = 0.0
    frames: int = 0
    shards: ShardReport | None = None  # sharded runs: where all the shards stand after this one
    missing: list[str] = field(default_factory=list)  # named by a list/split file but not on disk
    unlabeled: int = 0  # videos without a class (label -1) where they are a mistake: train-head cannot use them
    source_format: str = ""
    workers: int = 0  # decode processes used (the default_workers choice when --workers was not given)
    short: int = 0  # videos shorter than one clip: frames repeat (spool.sampling documents the rule)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (video_id, reason)

    @property
    def videos_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


# With a GPU, decoding is what feeds the backbone: every core but the main process's one
# decodes, up to this many (each worker holds about two decoded videos in memory).
MAX_WORKERS = 16


def default_workers(device: torch.device, cores: int) -> int:
    """The number of decode processes when --workers is not given.

    With a GPU the backbone does not compete for the CPU: one worker per core but one, up to
    MAX_WORKERS, to keep it fed. CPU-only, the backbone already runs on every core, so a worker
    takes cores away from it: on a 2-core machine one worker halves extraction (0.61 of the
    backbone alone) where inline decoding reaches 0.88 (docs/benchmarks.md, "Extraction"), so
    <= 2 cores decode inline, which gives up the time limit per video (a decoder that hangs
    in native code stops the run; --workers 1 keeps the limit). Bigger CPU-only machines get
    a quarter of their cores."""
    if device.type != "cpu":
        return max(1, min(MAX_WORKERS, cores - 1))
    return 0 if cores <= 2 else max(1, cores // 4)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which Slurm and taskset set)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def content_attrs(cfg: ExtractConfig, identity: WeightsIdentity) -> dict[str, Any]:
    return {
        "backbone": cfg.backbone,
        "timm_name": timm_name(cfg.backbone),
        "weights": dataclasses.asdict(identity),
        "image_size": cfg.image_size,
        "crop_pct": cfg.crop_pct,
        "interpolation": cfg.interpolation,
        "token_pool": cfg.token_pool,
        "frames": cfg.frames,
        "stride": cfg.stride,
        "clips": cfg.clips,
        "decoder": cfg.decoder,
    }


def open_or_create(cfg: ExtractConfig, source: VideoSource, encoder: FrameEncoder, identity: WeightsIdentity,
                   command: str, mode: str = "a"):
    """Open the store to resume it, or create it. A store made with other content-defining
    options or another video list is an error unless --overwrite. ``mode="r"`` (a shard) opens an
    existing store only to check it, since other shards may be writing it."""
    out = Path(cfg.out)
    content = content_attrs(cfg, identity)
    video_ids = [e.video_id for e in source.entries]
    labels = [e.label for e in source.entries]
    if out.exists() and not cfg.overwrite:
        store = open_store(out, mode=mode)
        saved = store.attrs.get("content", {})
        differing = [k for k in CONTENT_KEYS if saved.get(k) != content.get(k)]
        if differing:
            store.close()
            diffs = "; ".join(f"{CONTENT_OPTIONS.get(k, '--' + k)}: store has {saved.get(k)!r}, this run asks "
                              f"{content.get(k)!r}" for k in differing)  # fmt: skip
            raise StoreError(
                f"{out} was extracted with other options ({diffs}). Pass --overwrite to replace it, "
                "or choose another --out."
            )
        table = store.videos()
        if list(table.video_id) != video_ids or list(table.label) != labels:
            store.close()
            raise StoreError(
                f"{out} holds a different video list than {cfg.source} ({len(table.video_id)} vs {len(video_ids)} "
                "videos, or other ids/labels). Pass --overwrite to replace it, or choose another --out."
            )
        return store
    splits = [SPLIT_CODES[e.split] if e.split is not None else NO_SPLIT for e in source.entries]
    attrs = {
        "content": content,
        "backbone": cfg.backbone,
        "weights": dataclasses.asdict(identity),
        "image_size": cfg.image_size,
        "transform": {
            "resize": FrameTransform(cfg.image_size, cfg.crop_pct, cfg.interpolation).resize_size,
            "crop": cfg.image_size, "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation,
        },
        "patch_size": encoder.patch_size,
        "token_pool": cfg.token_pool,
        "sampling": {"frames": cfg.frames, "stride": cfg.stride, "clips": cfg.clips},
        "source": {"path": str(Path(cfg.source).resolve()), "format": source.format, "missing": source.missing},
        "extract_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_KEYS},
        "command": command,
    }
    return create_store(
        out,
        video_ids=video_ids,
        labels=labels,
        splits=splits,
        class_names=source.class_names,
        clips_per_video=cfg.clips,
        num_frames=cfg.frames,
        num_tokens=encoder.num_tokens,
        dim=encoder.dim,
        attrs=attrs,
        overwrite=cfg.overwrite,
    )


@dataclass(frozen=True)
class EncodedVideo:
    """One video through the backbone: its decoded clips and their features, float16 as stored."""

    decoded: DecodedVideo
    patches: np.ndarray  # (clips, T, L, D) float16
    cls: np.ndarray  # (clips, T, D) float16


class _VideoAssembly:
    """Per-video output buffers, filled batch by batch; complete when every frame has its features."""

    def __init__(self, key: Hashable, decoded: DecodedVideo, num_tokens: int, dim: int):
        clips, frames = decoded.frame_indices.shape
        self.key = key
        self.decoded = decoded
        self.patches = np.empty((clips * frames, num_tokens, dim), dtype=np.float16)
        self.cls = np.empty((clips * frames, dim), dtype=np.float16)
        self.remaining = clips * frames

    def finished(self) -> EncodedVideo:
        clips, frames = self.decoded.frame_indices.shape
        return EncodedVideo(
            self.decoded,
            self.patches.reshape(clips, frames, *self.patches.shape[1:]),
            self.cls.reshape(clips, frames, -1),
        )


def read_kwargs_of(cfg: ExtractConfig) -> dict[str, Any]:
    """What ``read_video`` needs from an extraction's options: how frames are sampled and cropped."""
    return dict(
        frames=cfg.frames, clips=cfg.clips, stride=cfg.stride, size=cfg.image_size,
        crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, decoder=cfg.decoder,
    )  # fmt: skip


def encode_videos(
    jobs: Iterable[tuple[Hashable, Path]],
    encoder: FrameEncoder,
    device: torch.device,
    *,
    read_kwargs: dict[str, Any],
    batch_size: int,
    workers: int,
    decode_timeout: float,
) -> Iterator[tuple[Hashable, EncodedVideo | DecodeError]]:
    """Decode each ``(key, path)`` job with ``read_video(path, **read_kwargs)`` in ``workers``
    processes and run the backbone on fixed-size batches of ``batch_size`` frames; yield
    ``(key, EncodedVideo)`` as each video's last frame leaves the backbone, or
    ``(key, DecodeError)``, in completion order.

    ``spool extract`` writes what this yields into a store; ``spool predict`` hands it to a
    head in memory, so both compute the same features from the same files. Close the
    generator (``contextlib.closing``) to stop the decoding processes early.
    """
    autocast = device.type == "cuda"
    size = read_kwargs["size"]
    batch = np.zeros((batch_size, size, size, 3), dtype=np.uint8)
    spans: list[tuple[_VideoAssembly, int, int, int]] = []  # (assembly, first frame, first row, count)
    filled = 0

    def run_batch() -> list[_VideoAssembly]:
        nonlocal filled, spans
        frames = torch.from_numpy(batch)
        if device.type == "cuda":
            frames = frames.pin_memory().to(device, non_blocking=True)
        x = normalize_frames(frames)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            cls, patches = encoder(x)
        cls = cls.to(torch.float16).cpu().numpy()
        patches = patches.to(torch.float16).cpu().numpy()
        complete = []
        for assembly, first, row, count in spans:
            assembly.patches[first : first + count] = patches[row : row + count]
            assembly.cls[first : first + count] = cls[row : row + count]
            assembly.remaining -= count
            if assembly.remaining == 0:
                complete.append(assembly)
        batch[:] = 0  # padding rows stay zero, so every batch is the same function of its frames
        spans, filled = [], 0
        return complete

    with DecodePool(workers, decode_timeout, **read_kwargs) as pool:
        for key, decoded in pool.imap_unordered(jobs):
            if isinstance(decoded, DecodeError):
                yield key, decoded
                continue
            assembly = _VideoAssembly(key, decoded, encoder.num_tokens, encoder.dim)
            video_frames = decoded.frames.reshape(-1, *decoded.frames.shape[2:])
            first = 0
            while first < len(video_frames):
                count = min(batch_size - filled, len(video_frames) - first)
                batch[filled : filled + count] = video_frames[first : first + count]
                spans.append((assembly, first, filled, count))
                filled += count
                first += count
                if filled == batch_size:
                    for done in run_batch():
                        yield done.key, done.finished()
        if filled:
            for done in run_batch():
                yield done.key, done.finished()


def run_extract(
    cfg: ExtractConfig,
    *,
    command: str = "",
    progress: bool = True,
    on_video_written: Callable[[int], None] | None = None,
    torchrun: TorchrunEnv | None = None,
) -> ExtractResult:
    """Extract features for every pending video of `cfg.source` into `cfg.out`.

    With ``cfg.shard`` i/n, only shard i's videos, written beside the other shards
    (``spool.stores.shards``); the last shard to finish merges their records. Under torchrun
    (``torchrun`` given, ``cfg.shard`` = rank/world size), rank 0 creates the store, waits for
    every rank to finish, then merges.

    Ctrl-C (KeyboardInterrupt) is re-raised after the videos already computed are written
    and the store is closed; the videos in flight stay PENDING, so re-running resumes.
    A failed store write (disk full) raises StoreError; the store stays resumable.
    """
    check_extract_options(cfg)
    source = load_source(
        Path(cfg.source),
        split_files=[Path(p) for p in cfg.split_files],
        labels_file=Path(cfg.labels_file) if cfg.labels_file else None,
        fmt=cfg.format,
    )
    if not source.entries:
        raise ValueError(f"no videos found in {cfg.source} (format {source.format})")
    # Under torchrun each rank runs on its own GPU; the config keeps the option as given, so a
    # store's attrs do not depend on which rank created it.
    device = rank_device(cfg.device, torchrun) if torchrun is not None else resolve_device(cfg.device)
    encoder, identity = load_backbone(
        cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, token_pool=cfg.token_pool, seed=cfg.seed
    )
    encoder = encoder.to(device)
    unlabeled = sum(e.label < 0 for e in source.entries)
    if source.format != "folder" and unlabeled < len(source.entries):
        unlabeled = 0  # a test split without labels (SSv2, Kinetics) is unlabeled by design
    # Resolved here, not in the config: the config (and so the store's attributes and
    # fingerprint) keeps "not given", whatever machine ran it.
    workers = cfg.workers if cfg.workers is not None else default_workers(device, usable_cores())
    result = ExtractResult(store=str(cfg.out), missing=list(source.missing), source_format=source.format,
                           unlabeled=unlabeled, workers=workers)  # fmt: skip
    if not cfg.shard.whole or torchrun is not None:
        _run_shard(cfg, source, encoder, identity, device, result, command, progress, on_video_written, torchrun)
        return result
    store = open_or_create(cfg, source, encoder, identity, command)
    try:
        status = store.videos().status
        retry = (PENDING, FAILED) if cfg.retry_failed else (PENDING,)
        pending = [v for v in range(store.num_videos) if status[v] in retry]
        result.skipped = store.num_videos - len(pending)
        _extract_pending(cfg, source, encoder, device, store, pending, result, progress, on_video_written)
        result.total_done = int((store.videos().status == DONE).sum())
    finally:
        store.close()
    return result


def check_extract_options(cfg: ExtractConfig) -> None:
    """What can be refused before decoding starts or weights load: a backbone that is not a ViT,
    a --size or --token-pool that does not tile its patch grid, --weights pretrained on a machine
    that has neither the weights cached nor the hub in reach."""
    check_backbone_options(cfg.backbone, cfg.image_size, cfg.token_pool)
    if cfg.weights == "pretrained":
        check_pretrained_available(cfg.backbone)


@contextlib.contextmanager
def _creation_lock(out: Path):
    """Serialises store creation between shards that start together: the first creates, the
    others find the store and check it. The lock file stays beside the store (see WriterLock)."""
    lock = out.parent / f".{out.name}.create.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run_shard(cfg, source, encoder, identity, device, result, command, progress, on_video_written, torchrun) -> None:
    index, count = cfg.shard.index, cfg.shard.count
    out = Path(cfg.out)
    # The ranks meet twice, over gloo (objects only, also beside GPUs): after rank 0 made the
    # store, and once all hold their shard. Everything else goes through the store's files.
    group = process_group(torchrun, torch.device("cpu")) if torchrun is not None else contextlib.nullcontext(Ranks())
    with group as ranks:
        error = None
        if ranks.main:
            try:
                with _creation_lock(out):
                    open_or_create(cfg, source, encoder, identity, command, mode="r").close()
            except (StoreError, ValueError, OSError) as err:
                error = err
        said = ranks.broadcast(None if error is None else str(error))  # the others raise it rather than hang
        if error is not None:
            raise error
        if said is not None:
            raise StoreError(f"rank 0 could not create or open the store: {said}")
        if cfg.workers is None and ranks.world_size > 1:
            # the ranks on one machine share its cores: each gets the default of its share
            result.workers = default_workers(device, max(1, usable_cores() // ranks.per_host()))
        writer = ShardWriter(out, index, count)
        try:
            ranks.barrier()  # every rank holds its shard: no stale marker can fool rank 0's wait
            status = writer.store.videos().status
            recorded = recorded_status(out)
            retry = (PENDING, FAILED) if cfg.retry_failed else (PENDING,)
            owned = shard_videos(writer.store.num_videos, index, count)
            pending = [int(v) for v in owned if status[v] in retry and recorded.get(int(v), status[v]) in retry]
            result.skipped = len(owned) - len(pending)
            _extract_pending(cfg, source, encoder, device, writer, pending, result, progress, on_video_written)
            writer.finish()
        finally:
            writer.close()
        if torchrun is None:
            _merge_if_alone(out)  # a job array's last shard to finish merges them all
        elif ranks.main:
            wait_for_shards(out, count, poll=2.0, on_wait=_waiting_notice(progress))
            open_store(out, mode="a").close()  # merges every rank's records
    result.shards = shard_report(out)
    result.total_done = result.shards.done_videos


def _waiting_notice(enabled: bool, every_s: float = 30.0):
    last = [-every_s]

    def notice(unfinished: list[int]) -> None:
        if enabled and time.monotonic() - last[0] >= every_s:
            last[0] = time.monotonic()
            names = ", ".join(map(str, unfinished[:8])) + (" ..." if len(unfinished) > 8 else "")
            print(f"rank 0: waiting for {len(unfinished)} rank(s) to finish: {names}", file=sys.stderr, flush=True)

    return notice


def _merge_if_alone(out: Path) -> None:
    try:
        store = open_store(out, mode="a")  # merges, if no other shard holds the store
    except StoreBusyError:
        return  # others still run; the last of them merges
    store.close()


def _extract_pending(cfg, source, encoder, device, store, pending, result, progress, on_video_written) -> None:
    entries = source.entries
    bar = RateProgress(total=len(pending), enabled=progress, description="extract")
    writes: queue.Queue = queue.Queue(maxsize=8)
    write_error: list[BaseException] = []

    def writer() -> None:
        # Runs beside the backbone: store writes (file I/O, chunk encoding, fsync) must not stall the GPU.
        while True:
            try:
                item = writes.get(timeout=COMMIT_INTERVAL_S)
            except queue.Empty:  # nothing to write for a while: commit what waits (the store batches commits)
                item = "commit"
            if item is None:
                break
            if write_error:
                continue
            video_index = None
            try:
                if item == "commit":
                    store.commit()
                    continue
                kind, video_index, payload = item
                if kind == "done":
                    encoded: EncodedVideo = payload
                    d = encoded.decoded
                    clips, frames = d.frame_indices.shape
                    store.write_video(video_index, encoded.patches, encoded.cls, d.frame_indices, d.num_frames, d.fps)
                    result.done += 1
                    result.short += int(d.short)
                    result.frames += clips * frames
                    bar.advance(frames=clips * frames)
                else:
                    store.mark_failed(video_index, payload)
                    result.failed += 1
                    result.failures.append((entries[video_index].video_id, payload))
                    bar.advance(failed=True)
                if on_video_written is not None:
                    on_video_written(video_index)
            except OSError as err:  # disk full, quota, I/O error: the commit protocol kept the store whole
                why = f"[Errno {err.errno}] {os.strerror(err.errno)}" if err.errno else " ".join(str(err).split())
                at = f"at video {entries[video_index].video_id!r}" if video_index is not None else "committing videos"
                write_error.append(StoreError(
                    f"writing {cfg.out} failed {at}: {why}. "
                    "The store keeps every video finished before it (it opens and resumes); "
                    "free space or fix the disk, then re-run the same command."
                ))
            except BaseException as err:  # surfaced in the main thread below
                write_error.append(err)

    thread = threading.Thread(target=writer, name="spool-store-writer", daemon=True)
    thread.start()
    start = time.perf_counter()
    jobs = ((v, entries[v].path) for v in pending)
    try:
        encoded_videos = encode_videos(
            jobs, encoder, device, read_kwargs=read_kwargs_of(cfg), batch_size=cfg.batch_size, workers=result.workers,
            decode_timeout=cfg.decode_timeout,
        )  # fmt: skip
        with bar, contextlib.closing(encoded_videos):
            for video_index, encoded in encoded_videos:
                if write_error:
                    raise write_error[0]
                if isinstance(encoded, DecodeError):
                    writes.put(("failed", video_index, str(encoded)))
                else:
                    writes.put(("done", video_index, encoded))
    finally:
        writes.put(None)
        thread.join()
        result.seconds = time.perf_counter() - start
    if write_error:
        raise write_error[0]
