"""From a feature store to training batches: splits, token pooling, and a feature set
that a grid of training runs can load once and share.

Reading order matters more than anything else here: a clip is one chunk in the store, so
every read is ``store.read_patches(sorted_clip_indices)`` for a whole batch, and the
pooled features of the needed clips are kept in RAM (or GPU memory) when they fit, so that
only the first epoch touches the disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from spool.ddp import share
from spool.distributed import Shard
from spool.stores.base import NO_SPLIT, SPLIT_CODES, FeatureStore

INPUTS = ("patches", "cls")
CACHE_MODES = ("auto", "none", "memory", "gpu")


class FeatureSetError(RuntimeError):
    """Features cannot be loaded as asked (too large for the cache, bad pooling, ...)."""


# --- splits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Clip indices (into the store) of each split, and which split evaluation uses.

    ``eval`` is ``val`` when the store has a validation split (or when one was drawn),
    otherwise ``test``: the store's own test split is never drawn from for model selection
    unless it is the only held-out split the store gives. ``select`` (``--val-from-train``):
    videos held out of train to choose the best epoch on, so that the number reported on
    ``eval`` is not also the one the choice was made on; empty when not asked for.
    """

    train: np.ndarray  # (n_train,) int64, sorted
    val: np.ndarray  # (n_val,) int64, sorted
    test: np.ndarray  # (n_test,) int64, sorted
    eval_split: str  # "val" or "test"
    source: str  # "store" (the store's own split codes) or "drawn" (grouped stratified split)
    seed: int | None = None  # of a drawn split
    val_fraction: float | None = None  # of a drawn split
    select: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # held out of train
    val_from_train: float = 0.0

    @property
    def eval(self) -> np.ndarray:
        return self.val if self.eval_split == "val" else self.test

    def summary(self) -> dict:
        return {
            "source": self.source,
            "eval_split": self.eval_split,
            "train": int(len(self.train)),
            "val": int(len(self.val)),
            "test": int(len(self.test)),
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "val_from_train": self.val_from_train,
            "select": int(len(self.select)),  # clips held out of train to choose the best epoch
        }


def _class_counts(videos: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None) -> str:
    """'walk: 3, run: 2, jump: 0' (videos per class), for messages. With the store's class names,
    every class is listed, those without a finished video too: often the cause of the message."""
    _, first = np.unique(videos, return_index=True)
    counts = np.bincount(labels[first].astype(np.int64))
    if class_names is not None and len(class_names) >= len(counts):
        counts = np.bincount(labels[first].astype(np.int64), minlength=len(class_names))
        parts = [f"{class_names[c]}: {n}" for c, n in enumerate(counts)]
    else:
        parts = [f"class {c}: {n}" for c, n in enumerate(counts) if n]
    return ", ".join(parts) if len(parts) <= 20 else ", ".join(parts[:20]) + f", … ({len(parts)} classes)"


def _draw_held_out(
    usable: np.ndarray, video_index: np.ndarray, label: np.ndarray, fraction: float, seed: int,
    option: str, class_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) clip indices: whole videos, stratified by class, one fold of round(1 / fraction)."""
    n_splits = max(2, int(round(1.0 / fraction)))
    groups = video_index[usable]
    num_videos = len(np.unique(groups))
    _, first = np.unique(groups, return_index=True)
    most = int(np.bincount(label[usable][first].astype(np.int64)).max())  # videos of the largest class
    # Too few videos, or scikit-learn's "n_splits=5 cannot be greater than the number of members
    # in each class" (it counts clips): say what the split needs, what each class has, what to pass.
    if num_videos < n_splits or np.bincount(label[usable].astype(np.int64)).max() < n_splits:
        if most >= 2:  # the largest fraction whose 1-in-n split fits the largest class
            fix = f"pass {option} {math.ceil(100 / most) / 100:g} or more (a split of 1 in {most} videos)"
        else:
            fix = "extract more videos: every class has one"
        if option == "--val-fraction":
            fix = f"Give the store a split (`spool extract --split-file`), or {fix}"
        else:  # drawn out of the train split, which a split file does not change
            fix = f"{fix[0].upper()}{fix[1:]}, or leave {option} out"
        raise FeatureSetError(
            f"{option} {fraction:g} holds out 1 in {n_splits} videos of each class, so the classes need at least "
            f"{n_splits} finished videos; videos per class: {_class_counts(groups, label[usable], class_names)} "
            f"({num_videos} in all). {fix}"
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only 3 members": such a class may get no held-out
        # video, which the split summary shows; a warning with a source line is noise here.
        warnings.simplefilter("ignore", UserWarning)
        kept, held = next(folds.split(usable, label[usable], groups))
    return np.sort(usable[kept]).astype(np.int64), np.sort(usable[held]).astype(np.int64)


def assign_splits(
    split: np.ndarray,
    video_index: np.ndarray,
    label: np.ndarray,
    done: np.ndarray,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    val_from_train: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> Splits:
    """Train / val / test clip indices from the per-clip columns of a store's ClipTable.

    Only clips whose video is DONE and that have a label (>= 0; unlabeled videos are
    stored with label -1) count. When any such clip carries a split code, the
    store's split is used as is (clips without a code are left out). Otherwise videos are
    drawn into val with scikit-learn's StratifiedGroupKFold (groups = videos, so no video
    lands in two splits; stratified by class; seeded), taking one fold of
    ``round(1 / val_fraction)`` as val. ``val_from_train`` > 0 then draws ``select`` out of
    train the same way. The train split must hold at least two classes; ``class_names``
    (the store's) names them in messages.
    """
    split = np.asarray(split)
    video_index = np.asarray(video_index)
    label = np.asarray(label)
    done = np.asarray(done, dtype=bool)
    usable = np.flatnonzero(done & (label >= 0))
    if len(usable) == 0:
        if done.any():
            finished = len(np.unique(video_index[done]))
            raise FeatureSetError(
                f"all {finished} finished videos of the store are unlabeled (label -1): the source gave them no "
                "class. A folder source needs one sub-folder per class (SRC/<class>/<video>); files directly in "
                "SRC are unlabeled. Arrange the videos so, or use a list or split file with labels, then re-run "
                "`spool extract ... --overwrite`"
            )
        raise FeatureSetError(
            "the store has no finished (DONE) videos with a label; run `spool extract` first "
            "(videos stored with label -1 are unlabeled and cannot be trained on)"
        )
    if not 0.0 <= val_from_train < 1.0:
        raise FeatureSetError(f"--val-from-train must be in [0, 1), got {val_from_train}")

    if np.any(split[usable] != NO_SPLIT):
        parts = {
            name: usable[split[usable] == code].astype(np.int64) for name, code in SPLIT_CODES.items()
        }
        if len(parts["train"]) == 0:
            raise FeatureSetError("the store's split codes give no training clips (split == train)")
        if len(parts["val"]) == 0 and len(parts["test"]) == 0:
            raise FeatureSetError("the store's split codes give no val or test clips to evaluate on")
        eval_split = "val" if len(parts["val"]) else "test"
        splits = Splits(parts["train"], parts["val"], parts["test"], eval_split, "store")
    else:
        if not 0.0 < val_fraction < 1.0:
            raise FeatureSetError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        train, val = _draw_held_out(usable, video_index, label, val_fraction, seed, "--val-fraction", class_names)
        empty = np.zeros(0, dtype=np.int64)
        splits = Splits(train, val, empty, "val", "drawn", seed=seed, val_fraction=val_fraction)
    _check_classes(splits.train, video_index, label, class_names, usable)
    if val_from_train > 0:
        # a different seed stream than the val draw, so the two draws are not the same fold pattern
        train, select = _draw_held_out(
            splits.train, video_index, label, val_from_train, seed + 7919, "--val-from-train", class_names
        )
        _check_classes(train, video_index, label, class_names, usable)
        splits = dataclasses.replace(splits, train=train, select=select, val_from_train=val_from_train)
    return splits


def _check_classes(train: np.ndarray, video_index, label, class_names, usable) -> None:
    """A train split of one class trains to 100% on any eval split of that class: refuse it."""
    classes = np.unique(label[train])
    if len(classes) < 2:
        held = _class_counts(video_index[usable], label[usable], class_names)
        c = int(classes[0]) if len(classes) else -1
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else f"class {c}"
        raise FeatureSetError(
            f"the train split holds videos of one class only ({name}); a classifier needs at least 2. "
            f"Finished, labeled videos per class in the store: {held}. Extract videos of more classes "
            "(`spool extract`), or check the split file"
        )


# --- token pooling ----------------------------------------------------------------------


def pooled_num_tokens(num_tokens: int, token_pool: int) -> int:
    """L' = (g / P)^2 for an L = g x g patch grid; raises when the pooling does not tile it."""
    g = int(round(num_tokens**0.5))
    if g * g != num_tokens:
        raise FeatureSetError(f"--token-pool needs a square patch grid, but L = {num_tokens} tokens per frame is not a square")
    if token_pool < 1 or g % token_pool:
        raise FeatureSetError(
            f"--token-pool {token_pool} must divide the patch grid side {g} (L = {num_tokens} = {g}x{g} tokens per frame)"
        )
    return (g // token_pool) ** 2


def pool_tokens(patches: np.ndarray, token_pool: int) -> np.ndarray:
    """Average P x P neighbouring patches: (..., L, D) -> (..., L / P^2, D), same dtype.

    Tokens are laid out row-major on the g x g grid (as a ViT emits them); the mean is taken
    in float32 so that float16 features do not lose precision in the sum.
    """
    if token_pool == 1:
        return patches
    *lead, L, D = patches.shape
    pooled_num_tokens(L, token_pool)
    g, P = int(round(L**0.5)), token_pool
    grid = patches.reshape(*lead, g // P, P, g // P, P, D)
    # Adding the P*P strided views into one float32 buffer: ~1.3x faster than
    # astype(float32).mean(axis=...), which first converts the whole batch.
    acc = np.zeros((*lead, g // P, g // P, D), dtype=np.float32)
    for i in range(P):
        for j in range(P):
            acc += grid[..., :, i, :, j, :]
    acc *= 1.0 / (P * P)
    return acc.reshape(*lead, (g // P) ** 2, D).astype(patches.dtype)


# --- memory -----------------------------------------------------------------------------


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --- feature set ------------------------------------------------------------------------


class FeatureSet:
    """The (pooled) features of a fixed set of clips of one store, ready to batch.

    Build it once and hand it to many ``train_head`` calls (an ablation grid does this):
    with ``cache="memory"`` or ``"gpu"`` the store is read once, here, and every later
    epoch of every run only indexes arrays. ``cache="none"`` reads each batch from the
    store (one sorted ``read_patches`` call per batch) on ``workers`` background threads
    (0: in the calling thread). ``cache="auto"`` picks "memory" when the features take at
    most half of the available RAM and "none" otherwise, and says which in ``cache_reason``;
    "memory" and "gpu" raise FeatureSetError, naming the sizes, when the set does not fit.

    ``inputs`` names what the heads need: ``("patches",)``, ``("cls",)`` or both; a
    mean-linear head never reads patches. ``splits``, when given, travels with the set so
    that every run trained on it uses the same train/eval clips. ``processes_per_host``: how
    many processes on this machine each build their own set (torchrun ranks); "auto" and
    "memory" then budget each one that share of the available RAM.
    """

    def __init__(
        self,
        store: FeatureStore,
        clip_indices: Sequence[int] | np.ndarray,
        *,
        token_pool: int = 1,
        inputs: Sequence[str] = ("patches",),
        cache: str = "auto",
        device: str | torch.device = "cpu",
        workers: int = 2,
        read_batch: int = 32,
        splits: Splits | None = None,
        processes_per_host: int = 1,
    ):
        unknown = set(inputs) - set(INPUTS)
        if unknown or not inputs:
            raise FeatureSetError(f"inputs must be a non-empty subset of {INPUTS}, got {tuple(inputs)}")
        if cache not in CACHE_MODES:
            raise FeatureSetError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.store = store
        self.splits = splits  # the splits the clips were chosen for; train_head reuses them
        self.fingerprint = store.attrs.get("fingerprint")
        self.store_path = str(store.path)
        self.clip_indices = np.unique(np.asarray(clip_indices, dtype=np.int64))  # sorted
        table = store.clips()
        if len(self.clip_indices) and not table.done[self.clip_indices].all():
            raise FeatureSetError(f"{store.path}: some requested clips belong to videos that are not DONE")
        self.labels = table.label[self.clip_indices].astype(np.int64)
        self.video_index = table.video_index[self.clip_indices].astype(np.int64)
        self.num_classes = len(store.class_names)
        self.class_names = store.class_names
        self.token_pool = int(token_pool)
        self.inputs = tuple(i for i in INPUTS if i in inputs)
        self.num_frames = store.num_frames
        self.num_tokens = pooled_num_tokens(store.num_tokens, self.token_pool) if "patches" in self.inputs else 0
        self.dim = store.dim
        self.workers = max(0, int(workers))
        self.read_batch = int(read_batch)
        self.device = torch.device(device)
        self.processes_per_host = max(1, int(processes_per_host))

        self.cache, self.cache_reason = self._resolve_cache(cache)
        self._local = threading.local()  # per-thread scratch buffers for pooled reads
        self._arrays: dict[str, np.ndarray | torch.Tensor] = {}
        if self.cache in ("memory", "gpu"):
            self._load_all()

    # -- sizes and cache choice --
    @property
    def clip_nbytes(self) -> int:
        """Bytes of one clip's features as kept in the cache (float16)."""
        n = 0
        if "patches" in self.inputs:
            n += self.num_frames * self.num_tokens * self.dim * 2
        if "cls" in self.inputs:
            n += self.num_frames * self.dim * 2
        return n

    @property
    def nbytes(self) -> int:
        return self.clip_nbytes * len(self.clip_indices)

    def _resolve_cache(self, cache: str) -> tuple[str, str]:
        need = self.nbytes
        if cache == "gpu":
            if self.device.type != "cuda" or not torch.cuda.is_available():
                raise FeatureSetError(f"--cache gpu needs a CUDA device; this run's --device is {self.device}")
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > 0.8 * free:
                raise FeatureSetError(
                    f"--cache gpu: the features need {_gib(need)} but the GPU has {_gib(free)} free "
                    f"(limit 80%); use --cache memory, a larger --token-pool, or fewer clips"
                )
            return "gpu", f"{_gib(need)} on {self.device} ({_gib(free)} free)"
        if cache == "none":
            return "none", "reading from the store every epoch (cache='none')"
        # each of the processes_per_host processes on this machine holds its own copy
        avail = available_memory_bytes() // self.processes_per_host
        where = "available" if self.processes_per_host == 1 else f"available to each of {self.processes_per_host} processes"
        if cache == "memory":
            if need > 0.9 * avail:
                raise FeatureSetError(
                    f"--cache memory: the features need {_gib(need)} but only {_gib(avail)} of RAM is "
                    f"{where} (limit 90%); use --cache none, a larger --token-pool, or fewer clips"
                )
            return "memory", f"{_gib(need)} in RAM ({_gib(avail)} {where})"
        if need <= 0.5 * avail:
            return "memory", f"auto: {_gib(need)} fits in RAM ({_gib(avail)} {where})"
        return "none", f"auto: {_gib(need)} is more than half of the {_gib(avail)} RAM {where}; reading per batch"

    # -- reading --
    def _read(self, pos: np.ndarray, dest: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """One sorted read per input for the clips at the given (sorted) positions.

        With ``dest`` (views into the cache arrays) the store reads straight into them.
        Pooled patches are first read into a per-thread scratch buffer that is reused
        batch after batch: a fresh 100 MB array costs more in page faults than the read
        itself (docs/benchmarks.md, "Store reads")."""
        clips = self.clip_indices[pos]
        dest = dest or {}
        out = {}
        if "patches" in self.inputs:
            if self.token_pool == 1:
                out["patches"] = self.store.read_patches(clips, out=dest.get("patches"))
                self._check_not_lost("patches", out["patches"], pos)
            else:
                raw = self.store.read_patches(clips, out=self._scratch(len(clips)))
                self._check_not_lost("patches", raw, pos)
                out["patches"] = pool_tokens(raw, self.token_pool)
                if "patches" in dest:
                    dest["patches"][...] = out["patches"]
        if "cls" in self.inputs:
            out["cls"] = self.store.read_cls(clips, out=dest.get("cls"))
            self._check_not_lost("cls", out["cls"], pos)
        return out

    def _check_not_lost(self, name: str, features: np.ndarray, pos: np.ndarray) -> None:
        """Refuse clips of DONE videos that read as all zeros. An HDF5 store (or a zarr store with
        compressed chunks) reads a chunk that was never written, or was lost, as zeros without an
        error; backbone features are never all zero, so training on them would be a silent wrong
        result. Comparing the bits is about half the cost of copying the batch once."""
        if not len(pos):
            return
        bits = np.ascontiguousarray(features).reshape(len(pos), -1)
        lost = ~(bits.view(np.uint16) if bits.dtype == np.float16 else bits).any(axis=1)
        if not lost.any():
            return
        clips = self.clip_indices[pos[lost]]
        ids = self.store.videos().video_id[self.video_index[pos[lost]]]
        shown = ", ".join(f"clip {c} (video {v!r})" for c, v in list(zip(clips.tolist(), ids))[:3])
        more = f" and {len(clips) - 3} more" if len(clips) > 3 else ""
        raise FeatureSetError(
            f"{self.store_path}: the {name} of {shown}{more} read as all zeros, but the videos are DONE: their "
            f"chunks were lost and the store is damaged. `spool verify --repair {self.store_path}` marks the damaged "
            "videos pending; then re-run the same `spool extract` command to extract them again"
        )

    def _scratch(self, n: int) -> np.ndarray:
        shape = (n, self.num_frames, self.store.num_tokens, self.dim)
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.shape[0] < n:
            buf = self._local.scratch = np.empty(shape, dtype=np.float16)
        return buf[:n]

    def _chunks(self, groups: list[np.ndarray], dests: list[dict] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Read each group of positions in order. With ``workers`` >= 1, that many threads
        read ahead (up to workers + 1 groups in flight) while the caller computes: the
        store's reads and numpy's copies release the GIL, so the next batches arrive while
        the model trains on this one. ``workers=0`` reads in the caller's thread."""
        dests = dests or [None] * len(groups)
        if self.workers == 0:
            for pos, dest in zip(groups, dests):
                yield self._read(pos, dest)
            return
        with ThreadPoolExecutor(self.workers) as pool:
            pending = []
            for pos, dest in zip(groups, dests):
                pending.append(pool.submit(self._read, pos, dest))
                if len(pending) > self.workers:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()

    def _load_all(self) -> None:
        n = len(self.clip_indices)
        shapes = {
            "patches": (n, self.num_frames, self.num_tokens, self.dim),
            "cls": (n, self.num_frames, self.dim),
        }
        groups = [np.arange(s, min(s + self.read_batch, n)) for s in range(0, n, self.read_batch)]
        if self.cache == "gpu":
            # chunk by chunk, so that host memory never holds the whole set
            tensors = {k: torch.empty(shapes[k], dtype=torch.float16, device=self.device) for k in self.inputs}
            for g, data in zip(groups, self._chunks(groups)):
                for k in self.inputs:
                    tensors[k][g[0] : g[-1] + 1].copy_(torch.from_numpy(data[k]))
            self._arrays = tensors
            return
        arrays = {k: np.empty(shapes[k], dtype=np.float16) for k in self.inputs}
        dests = [{k: a[g[0] : g[-1] + 1] for k, a in arrays.items()} for g in groups]
        for _ in self._chunks(groups, dests):
            pass  # each read lands in its slice of ``arrays``
        self._arrays = arrays

    def positions(self, clip_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions in this set of the given store clip indices (all must be in the set)."""
        clip_indices = np.asarray(clip_indices, dtype=np.int64)
        pos = np.searchsorted(self.clip_indices, clip_indices)
        pos = np.minimum(pos, len(self.clip_indices) - 1)
        if len(clip_indices) and (len(self.clip_indices) == 0 or np.any(self.clip_indices[pos] != clip_indices)):
            raise FeatureSetError("some requested clips were not loaded into this feature set")
        return pos

    def batches(
        self,
        clip_indices: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        shard: Shard | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of the given clips as tensors on ``device``.

        Each batch is a dict with ``label``, ``clip`` and ``video`` (int64, (B,)) and the
        inputs of this set: ``patches`` (B, T, L', D) and/or ``cls`` (B, T, D), float16.
        Shuffling is a function of (seed, epoch) alone, so a resumed run sees the same
        batches. Clips inside a batch are in store order (one sorted read per batch).
        ``shard``: yield only this shard's contiguous part of every batch (spool.ddp.share;
        it may be empty), so that the shards of one batch, in order, are the batch.
        """
        pos = self.positions(clip_indices)
        if shuffle:
            pos = pos[np.random.default_rng([seed, epoch]).permutation(len(pos))]
        stop = len(pos) - (len(pos) % batch_size if drop_last else 0)
        groups = [np.sort(pos[s : min(s + batch_size, stop)]) for s in range(0, stop, batch_size)]
        if shard is not None:
            groups = [g[share(len(g), shard)] for g in groups]
        device = torch.device(device)
        if self.cache == "none":
            source = self._chunks(groups)  # fresh arrays per batch: the caller may keep them
        else:
            source = (self._take(g) for g in groups)
        for g, data in zip(groups, source):
            batch = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in data.items()}
            batch["label"] = torch.from_numpy(self.labels[g]).to(device)
            batch["clip"] = torch.from_numpy(self.clip_indices[g])
            batch["video"] = torch.from_numpy(self.video_index[g])
            yield batch

    def _take(self, pos: np.ndarray) -> dict[str, np.ndarray | torch.Tensor]:
        if self.cache == "gpu":
            idx = torch.from_numpy(pos).to(self.device)
            return {k: v.index_select(0, idx) for k, v in self._arrays.items()}
        return {k: v[pos] for k, v in self._arrays.items()}

    def __len__(self) -> int:
        return len(self.clip_indices)

    def describe(self) -> dict:
        return {
            "clips": len(self),
            "inputs": list(self.inputs),
            "token_pool": self.token_pool,
            "num_tokens": self.num_tokens,
            "cache": self.cache,
            "cache_reason": self.cache_reason,
            "nbytes": self.nbytes,
        }
