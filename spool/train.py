"""``spool train-head``: train and evaluate a head on the cached features of one store.

    cfg = TrainConfig(store="feats.zarr", out="runs/a", lookahead=4)
    result = train_head(cfg)            # result.top1: video-level top-1 on the eval split

An ablation grid builds one ``FeatureSet`` with ``load_features`` and calls
``train_head(dataclasses.replace(cfg, ...), features=fs)`` per configuration: the store is
read once for the whole grid.

Evaluation uses the store's val split, or its test split when it has no val; a store
without split codes gets a val split drawn per video, stratified by class (spool.data).
On CPU a run is bit-for-bit reproducible from its seed (weights, dropout and batch order);
on CUDA, bf16 autocast and non-deterministic kernels allow small differences.

Under torchrun (``train_head(cfg, dist=torchrun_env())``) the run trains with
DistributedDataParallel: ``batch_size`` stays the global batch, each rank takes one share of
every batch (spool.ddp), and the result equals one process's within floating-point
tolerance; with dropout the masks differ (each rank draws its own), so such runs are equal
in distribution only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from spool.attention import BACKENDS
from spool.baselines import NORMS, AttentiveProbeConfig, MeanLinearConfig
from spool.checkpoint import (
    HEAD_INPUTS,
    build_head,
    load_checkpoint,
    save_checkpoint,
    strip_compile_prefix,
)
from spool.data import CACHE_MODES, FeatureSet, Splits, assign_splits
from spool.ddp import Ranks, process_group, share, state_digest, sync_batchnorm
from spool.device import resolve_device
from spool.files import write_json
from spool.distributed import TorchrunEnv, rank_device
from spool.efficiency import PeakMemory, forward_flops, param_count
from spool.metrics import classification_metrics, plot_confusion, plot_curves, video_logits
from spool.mask import grid_side
from spool.model import HeadConfig
from spool.progress import make_console


class TrainError(RuntimeError):
    """A training run that cannot start or continue as configured."""


class NonFiniteLossError(TrainError):
    """The loss became NaN or infinite; the run stopped before writing a checkpoint."""


class ResumeMismatchError(TrainError):
    """``resume=True`` but the checkpoint in ``out`` was trained with different options."""


@dataclass(frozen=True)
class TrainConfig:
    store: str
    out: str
    head: str = "spool"  # "spool" | "full" | "factorized" | "mean-linear" | "attentive-probe"
    # Spool head (HeadConfig); give at most one of lookahead/lookback, the other is the rest
    num_heads: int = 6
    lookahead: int | None = None  # num_lookahead_heads; neither given: num_heads // 2
    lookback: int | None = None  # num_lookback_heads = num_heads - num_lookahead_heads
    local_frame_range: int | str = 2  # or "all": T - 1, every frame on each head's side
    depth: int = 4
    dim: int | None = None
    context_frames: bool = True
    # motion on frozen features (docs/benchmarks.md, "Real features"): a learned embedding of
    # each token's position in the frame, a local correlation of every token with its
    # neighbourhood in the frames within --range (None: off; standardised per token and with
    # its position moments, see spool.model.LocalCorrelation), and an optional spatial window
    # on attention between clip frames (None: every position)
    spatial_embedding: bool = True
    correlation_range: int | None = 1
    correlation_token_norm: bool = True
    correlation_moments: bool = True
    spatial_range: int | None = None
    dropout: float = 0.0
    backend: str = "auto"
    token_pool: int = 1
    norm: str = "batchnorm"  # mean-linear only: "batchnorm" | "layernorm" | "none"
    temporal_embedding: bool = False  # attentive-probe only: learned per-frame embedding (V-JEPA's has none)
    # optimisation
    epochs: int = 20
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 1.0  # epochs of linear warm-up (fractions allowed), then cosine to zero
    label_smoothing: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    seed: int = 0
    # data and machine
    val_fraction: float = 0.2
    val_from_train: float = 0.0  # > 0: choose the best epoch on this fraction of train, held out
    cache: str = "auto"  # "auto" | "none" | "memory" | "gpu" (see FeatureSet)
    workers: int = 2
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    resume: bool = False
    overwrite: bool = False  # replace a run in ``out`` made with other options


# Options that change how a run executes but not what it computes; resume ignores them.
# The number of processes (torchrun's world size) is not an option but belongs here too: it is
# recorded in config.json and the checkpoints, and a run may resume with another one, since
# the result is the same function of the options (except with dropout, see _run).
RESUME_FREE_KEYS = ("resume", "overwrite", "cache", "workers", "device", "out", "store")
# A key that an older Spool did not write into config.json or a checkpoint had its default then:
# today's default, except for the keys added since with another default.
TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)} | {
    "spatial_embedding": False,
    "correlation_range": None,
    "correlation_token_norm": False,  # runs with --correlation before these two: raw cosines only
    "correlation_moments": False,
}


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float  # clip level
    eval_top1: float  # video level
    eval_top5: float | None  # None with fewer than 5 classes
    eval_topk: float  # top-k with k = min(5, num_classes)
    lr: float  # at the end of the epoch
    clips_per_s: float  # training throughput, loading included
    select_top1: float | None = None  # video level, on the videos held out of train (--val-from-train)
    eval_videos_per_s: float | None = None  # evaluation throughput on the eval split, loading included


@dataclass
class TrainResult:
    out: Path
    history: list[EpochRecord]
    final: dict  # eval metrics of the last epoch: top1, top5, top_k, per-class, confusion
    best: dict  # {"epoch", "top1" (on the eval split), "chosen_on", "select_top1"} of checkpoint_best.pt
    config: dict  # what config.json holds

    @property
    def top1(self) -> float:
        """The last epoch's top-1 on the eval split: the number to report."""
        return self.final["top1"]

    def result_line(self) -> str:
        """Final and best, said apart, with where the best epoch was chosen."""
        split = self.config["splits"]["eval_split"]
        epochs = len(self.history)
        line = f"{self.out}: final {split} top-1 {100 * self.top1:.1f}% (epoch {epochs})"
        if not self.best.get("epoch"):
            return line
        at = f"best epoch {self.best['epoch']}"
        if self.best.get("chosen_on") == "val-from-train":
            return (
                f"{line}; {at}, chosen on the {self.config['splits']['val_from_train']:g} of train held out "
                f"(top-1 {100 * self.best['select_top1']:.1f}% there): {split} top-1 {100 * self.best['top1']:.1f}%"
            )
        return (
            f"{line}; {at}: {100 * self.best['top1']:.1f}%, chosen on the same {split} split, so optimistic "
            "(--val-from-train chooses on videos held out of train)"
        )


# --- resolving the config ---------------------------------------------------------------


def resolve_lookahead(num_heads: int, lookahead: int | None, lookback: int | None) -> int:
    """num_lookahead_heads from --lookahead / --lookback; neither given: half the heads
    (rounded down; 3 of the default 6, HeadConfig's default)."""
    if lookahead is None and lookback is None:
        return num_heads // 2
    if lookahead is not None and lookback is not None and lookahead + lookback != num_heads:
        raise TrainError(
            f"--lookahead {lookahead} + --lookback {lookback} must equal --heads {num_heads}; give one of them"
        )
    n = lookahead if lookahead is not None else num_heads - lookback
    if not 0 <= n <= num_heads:
        given = f"--lookahead {lookahead}" if lookahead is not None else f"--lookback {lookback}"
        raise TrainError(f"{given} leaves {n} lookahead heads; it must be between 0 and --heads {num_heads}")
    return n


def resolve_range(local_frame_range: int | str, num_frames: int) -> int:
    """--range as an int; "all" is T - 1, the window that holds every frame on a head's side."""
    return max(0, num_frames - 1) if local_frame_range == "all" else local_frame_range


def _correlation(cfg: TrainConfig, num_frames: int, num_tokens: int) -> int | None:
    """correlation_range for HeadConfig, or None where it cannot apply (a one-frame clip, a head
    whose window is 0 frames, one token a frame to standardise over). A token grid that is not
    square is an error (say the option)."""
    if cfg.correlation_range is None or (num_tokens == 1 and cfg.correlation_token_norm):
        return None
    try:
        grid_side(num_tokens)
    except ValueError:
        raise TrainError(
            f"--correlation {cfg.correlation_range} needs a square token grid; the store's L = {num_tokens} is not "
            "one. Pass --correlation none"
        ) from None
    return cfg.correlation_range if num_frames >= 2 and _reach(cfg, num_frames) >= 1 else None


def _reach(cfg: TrainConfig, num_frames: int) -> int:
    """Frames each way the head's window reaches (full and factorized: the default --range)."""
    if cfg.head == "spool":
        return resolve_range(cfg.local_frame_range, num_frames)
    return TRAIN_DEFAULTS["local_frame_range"]


def make_head_config(cfg: TrainConfig, *, in_dim: int, num_frames: int, num_tokens: int, num_classes: int):
    _check_width(cfg, in_dim)
    if cfg.head in ("spool", "full", "factorized"):
        spool = cfg.head == "spool"  # full and factorized ignore the head split, the range and the backend
        return HeadConfig(
            in_dim=in_dim,
            num_frames=num_frames,
            num_tokens=num_tokens,
            num_classes=num_classes,
            dim=cfg.dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            local_frame_range=resolve_range(cfg.local_frame_range, num_frames) if spool else 0,
            context_frames=cfg.context_frames,
            dropout=cfg.dropout,
            backend=cfg.backend if spool else "auto",
            num_lookahead_heads=resolve_lookahead(cfg.num_heads, cfg.lookahead, cfg.lookback) if spool else 0,
            attention=cfg.head,
            spatial_embedding=cfg.spatial_embedding,
            # the correlation reaches as far as the Spool head's window; the references, which
            # have none, take the default window's reach so their inputs match the default head
            correlation_range=_correlation(cfg, num_frames, num_tokens),
            correlation_frames=max(1, min(_reach(cfg, num_frames), num_frames - 1)),
            correlation_token_norm=cfg.correlation_token_norm,
            correlation_moments=cfg.correlation_moments,
            spatial_range=cfg.spatial_range if spool else None,
        )
    if cfg.head == "mean-linear":
        return MeanLinearConfig(in_dim=in_dim, num_classes=num_classes, norm=cfg.norm)
    if cfg.head == "attentive-probe":
        return AttentiveProbeConfig(
            in_dim=in_dim,
            num_classes=num_classes,
            num_frames=num_frames,
            num_heads=cfg.num_heads,
            temporal_embedding=cfg.temporal_embedding,
        )
    raise TrainError(f"unknown head {cfg.head!r}; expected one of {sorted(HEAD_INPUTS)}")


def _check_width(cfg: TrainConfig, in_dim: int) -> None:
    """A head width the heads' configs would refuse, said in train-head's options before they
    say it in their field names (HeadConfig.dim, num_heads)."""
    if cfg.head in ("spool", "full", "factorized") and (cfg.dim or in_dim) % cfg.num_heads:
        width = f"--dim {cfg.dim}" if cfg.dim else f"the features' width {in_dim} (the default --dim)"
        raise TrainError(
            f"{width} is not divisible by --heads {cfg.num_heads}; pass a --heads that divides it, or a --dim "
            "that is a multiple of --heads"
        )
    if cfg.head == "attentive-probe" and in_dim % cfg.num_heads:
        raise TrainError(
            f"--head attentive-probe attends over the features' width {in_dim}, which --heads {cfg.num_heads} "
            "does not divide; pass a --heads that divides it"
        )


def _check(cfg: TrainConfig) -> None:
    """The options, checked before the store is read, in train-head's option names."""
    if cfg.head not in HEAD_INPUTS:
        raise TrainError(f"unknown head {cfg.head!r} (--head); expected one of {sorted(HEAD_INPUTS)}")
    if isinstance(cfg.local_frame_range, str) and cfg.local_frame_range != "all":
        raise TrainError(f"--range must be an integer >= 0 or 'all', got {cfg.local_frame_range!r}")
    at_least = {"epochs": 1, "batch_size": 1, "num_heads": 1, "depth": 1, "token_pool": 1, "local_frame_range": 0}
    for name, low in at_least.items():
        if getattr(cfg, name) != "all" and getattr(cfg, name) < low:
            raise TrainError(f"{OPTION_NAMES[name]} must be >= {low}, got {getattr(cfg, name)}")
    checks = [
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.dim is None or cfg.dim >= 1, f"--dim must be >= 1, got {cfg.dim}"),
        (cfg.correlation_range is None or cfg.correlation_range >= 0,
         f"--correlation must be >= 0 or 'none', got {cfg.correlation_range}"),
        (cfg.correlation_range != 0 or not cfg.correlation_token_norm,
         "--correlation 0 leaves one position to standardise a token's cosines over: pass --correlation 1 or "
         "more, or --no-correlation-token-norm"),
        (cfg.spatial_range is None or cfg.spatial_range >= 0,
         f"--spatial-range must be >= 0 or 'all', got {cfg.spatial_range}"),
        (0.0 <= cfg.dropout < 1.0, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        (0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0 turns clipping off), got {cfg.grad_clip}"),
        (0.0 < cfg.val_fraction < 1.0, f"--val-fraction must be in (0, 1), got {cfg.val_fraction}"),
        (0.0 <= cfg.val_from_train < 1.0, f"--val-from-train must be in [0, 1) (0: off), got {cfg.val_from_train}"),
        (cfg.backend in ("auto", *BACKENDS), f"--backend must be one of auto, {', '.join(BACKENDS)}; got {cfg.backend!r}"),
        (cfg.cache in CACHE_MODES, f"--cache must be one of {', '.join(CACHE_MODES)}; got {cfg.cache!r}"),
        (cfg.norm in NORMS, f"--norm must be one of {', '.join(NORMS)}; got {cfg.norm!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainError(message)
    if cfg.head == "spool":
        resolve_lookahead(cfg.num_heads, cfg.lookahead, cfg.lookback)


# TrainConfig field -> train-head option, for messages (the others are "--" + the field, dashed)
OPTION_NAMES = {
    "epochs": "--epochs", "batch_size": "--batch-size", "num_heads": "--heads", "depth": "--depth",
    "token_pool": "--token-pool", "local_frame_range": "--range", "correlation_range": "--correlation",
}  # fmt: skip


def option_diff(key: str, saved, asked) -> str:
    """One differing TrainConfig field, in train-head's option names: '--range (saved 2, asked 1)'."""
    if key == "context_frames":  # the option is its negation
        return f"--no-context (saved {not saved}, asked {not asked})"
    return f"{OPTION_NAMES.get(key, '--' + key.replace('_', '-'))} (saved {saved!r}, asked {asked!r})"


# --- optimisation -------------------------------------------------------------------------


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Weight decay on the weight matrices of linear layers only: not on biases, norms,
    # embeddings (time_embed, C_start/C_end are 2-D but are not weights of a layer) and query tokens.
    params = [p for p in model.parameters() if p.requires_grad]
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay = [p for p in params if id(p) in linear]
    other = [p for p in params if id(p) not in linear]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr
    )


def _forward(model: nn.Module, inputs: tuple[str, ...], batch: dict) -> torch.Tensor:
    return model(*[batch[k].float() for k in inputs])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model, inputs, features: FeatureSet, clips: np.ndarray, batch_size: int, device, ranks: Ranks = Ranks()
) -> dict:
    """Video-level metrics of ``model`` on ``clips``. With several ranks each evaluates a
    contiguous run of the batches one process would make, and the clip logits are gathered in
    order: every rank gets the metrics of one process."""
    _, vlogits, vlabels = eval_video_logits(model, inputs, features, clips, batch_size, device, ranks)
    return classification_metrics(vlogits, vlabels, features.num_classes)


@torch.no_grad()
def eval_video_logits(
    model, inputs, features: FeatureSet, clips: np.ndarray, batch_size: int, device, ranks: Ranks = Ranks()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(video indices (V,), video logits (V, C) float64, labels (V,)) of ``model`` on ``clips``:
    each video's clip logits averaged over its views (spool.metrics.video_logits). What
    ``evaluate`` scores, and what ``spool predict`` reports for a store."""
    model.eval()
    num_batches = math.ceil(len(clips) / batch_size)
    mine = share(num_batches, ranks.shard)
    logits = [np.zeros((0, features.num_classes), np.float32)]
    labels, videos = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for batch in features.batches(clips[mine.start * batch_size : mine.stop * batch_size], batch_size, device=device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = _forward(model, inputs, batch)
        logits.append(out.float().cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
        videos.append(batch["video"].numpy())
    parts = ranks.gather((np.concatenate(logits), np.concatenate(labels), np.concatenate(videos)))
    logits, labels, videos = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return video_logits(logits, videos, labels)


# --- the run ------------------------------------------------------------------------------


def _open_store(path: str):
    from spool.stores import open_store
    from spool.stores.shards import recorded_status

    if unmerged := len(recorded_status(path)):
        # Those videos would be missing from training without a word, skewing any comparison.
        raise TrainError(
            f"{path} holds {unmerged} videos in shard records not yet merged into the store; "
            f"run `spool merge-shards {path}` first (it refuses while a shard still runs)"
        )
    return open_store(path, mode="r")


def load_features(
    cfg: TrainConfig,
    store=None,
    *,
    splits: Splits | None = None,
    inputs: tuple[str, ...] | None = None,
    device: torch.device | None = None,
    processes_per_host: int = 1,
) -> tuple[FeatureSet, Splits]:
    """The FeatureSet (train + eval clips) and splits a TrainConfig asks for.

    A grid calls this once and passes the FeatureSet to every ``train_head`` whose head
    inputs and token_pool it covers: ``inputs=("patches", "cls")`` serves every head. Runs
    on a shared set use its splits (drawn with ``cfg.seed`` and ``cfg.val_fraction`` of the
    config given here), so a grid over seeds varies the head's initialisation and batch
    order, not the split. The caller closes ``features.store`` when done. ``device`` (default:
    ``cfg.device`` resolved) and ``processes_per_host`` go to the FeatureSet."""
    store = store if store is not None else _open_store(cfg.store)
    if splits is None:
        t = store.clips()
        splits = assign_splits(
            t.split, t.video_index, t.label, t.done, val_fraction=cfg.val_fraction, seed=cfg.seed,
            val_from_train=cfg.val_from_train, class_names=store.class_names,
        )  # fmt: skip
    clips = np.concatenate([splits.train, splits.eval, splits.select])
    features = FeatureSet(
        store,
        clips,
        token_pool=cfg.token_pool,
        inputs=inputs or HEAD_INPUTS[cfg.head],
        cache=cfg.cache,
        device=device if device is not None else resolve_device(cfg.device),
        workers=cfg.workers,
        splits=splits,
        processes_per_host=processes_per_host,
    )
    return features, splits


def _config_json(cfg: TrainConfig, head_cfg, features: FeatureSet, splits: Splits, device, world_size: int) -> dict:
    return {
        "train": asdict(cfg),
        "head": cfg.head,
        "head_config": asdict(head_cfg),
        "store": {"path": features.store_path, "fingerprint": features.fingerprint,
                  "extraction": extraction_record(features.store)},  # fmt: skip
        "splits": splits.summary(),
        "features": features.describe(),
        "device": str(device),  # rank 0's
        "world_size": world_size,  # processes that trained together (torchrun); 1 alone
        "torch": torch.__version__,
    }


def extraction_record(store) -> dict:
    """How the store's features were made, kept in the run (config.json and every checkpoint) so
    that ``spool predict`` can make the same features from new videos without the store: the
    content attributes (backbone, weights identity, transform, sampling), the classes and shapes,
    and the frames per backbone call."""
    attrs = store.attrs
    return {
        "content": attrs.get("content", {}),
        "class_names": store.class_names,
        "num_frames": store.num_frames,
        "num_tokens": store.num_tokens,
        "dim": store.dim,
        "clips_per_video": store.clips_per_video,
        "batch_size": attrs.get("extract_config", {}).get("batch_size"),
    }


def _diff_keys(saved: dict, wanted: dict) -> list[str]:
    keys = (set(saved) | set(wanted)) - set(RESUME_FREE_KEYS)
    if saved.get("correlation_range", TRAIN_DEFAULTS["correlation_range"]) is None is wanted.get("correlation_range"):
        keys -= {"correlation_token_norm", "correlation_moments"}  # only the correlation reads them
    return sorted(k for k in keys if saved.get(k, TRAIN_DEFAULTS.get(k)) != wanted.get(k))


RUN_FILES = ("config.json", "metrics.json", "checkpoint_last.pt", "checkpoint_best.pt")


def _run_folder_problem(cfg: TrainConfig, out: Path, fingerprint: str | None) -> str | None:
    """Why training into ``out`` would silently replace an earlier run made with other options
    or on another store (None: it would not). ``--resume`` is checked against its checkpoint."""
    path = out / "config.json"
    if cfg.overwrite or cfg.resume or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        saved_train, saved_store = saved["train"], saved["store"].get("fingerprint")
    except (OSError, ValueError, KeyError, AttributeError):
        return f"{out} holds a config.json that is not a Spool run's; pass --overwrite to replace it, or another --out"
    wanted = asdict(cfg)
    diff = [option_diff(k, saved_train.get(k, TRAIN_DEFAULTS.get(k)), wanted.get(k))
            for k in _diff_keys(saved_train, wanted)]  # fmt: skip
    if saved_store != fingerprint:
        diff.append(f"the store (saved fingerprint {saved_store}, {cfg.store} has {fingerprint})")
    if not diff:
        return None
    return (
        f"{out} holds a run trained with other options; differing: {', '.join(diff)}. Pass --overwrite to replace "
        "it, choose another --out, or --resume with its options to continue it"
    )


def train_head(
    cfg: TrainConfig,
    *,
    features: FeatureSet | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
    dist: TorchrunEnv | None = None,
) -> TrainResult:
    """Train ``cfg.head`` on the store's train split, evaluate each epoch on the eval split
    (val, or the store's test split when it has no val), write the outputs to ``cfg.out``.

    ``features``: a FeatureSet from ``load_features`` to reuse (it must come from the same
    store, hold the head's inputs with the same token_pool, and carry its splits).
    ``on_epoch_end`` is called after each epoch's checkpoint is written.
    ``dist``: this process's place under torchrun (``spool.distributed.torchrun_env()``, read
    by the command line). The processes then train one model with DistributedDataParallel
    (NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU), ``cfg.batch_size`` being the global batch;
    every rank returns the same result, rank 0 alone writes and prints, ``on_epoch_end`` runs
    on every rank.
    Raises NonFiniteLossError on a NaN/inf loss, ResumeMismatchError when resuming with
    other options than the checkpoint's.
    """
    _check(cfg)
    if dist is None:
        return _train(cfg, features, progress, on_epoch_end, Ranks(), resolve_device(cfg.device))
    if cfg.batch_size < dist.world_size:
        raise TrainError(
            f"--batch-size {cfg.batch_size} is the global batch, split over the {dist.world_size} processes; "
            f"it must be at least {dist.world_size}, one clip per process"
        )
    device = rank_device(cfg.device, dist)
    with process_group(dist, device) as ranks:
        return _train(cfg, features, progress, on_epoch_end, ranks, device)


def _train(cfg, features: FeatureSet | None, progress, on_epoch_end, ranks: Ranks, device) -> TrainResult:
    out = Path(cfg.out)

    def check_out(fingerprint: str | None) -> None:
        # rank 0 alone may see --out (several machines); every rank raises what it found
        problem = ranks.broadcast(_run_folder_problem(cfg, out, fingerprint) if ranks.main else None)
        if problem is not None:
            raise TrainError(problem)

    owns_store = features is None
    if features is None:
        store = _open_store(cfg.store)
        try:
            check_out(store.attrs.get("fingerprint"))
            features, splits = load_features(cfg, store, device=device, processes_per_host=ranks.per_host())
        except BaseException:
            store.close()
            raise
    else:
        check_out(features.fingerprint)
        splits = features.splits
        if splits is None:
            raise TrainError("the given FeatureSet carries no splits; build it with spool.train.load_features")
        if Path(features.store_path).resolve() != Path(cfg.store).resolve():
            raise TrainError(f"the given FeatureSet was read from {features.store_path}, but cfg.store is {cfg.store}")
        needed = HEAD_INPUTS[cfg.head]
        if not set(needed) <= set(features.inputs) or features.token_pool != cfg.token_pool:
            raise TrainError(
                f"the given FeatureSet holds inputs {features.inputs} with token_pool={features.token_pool}, "
                f"but head {cfg.head!r} needs {needed} with token_pool={cfg.token_pool}"
            )
    try:
        return _run(cfg, features, splits, device, out, progress and ranks.main, on_epoch_end, ranks)
    finally:
        if owns_store:
            features.store.close()


def _run(
    cfg, features: FeatureSet, splits: Splits, device, out: Path, progress, on_epoch_end, ranks: Ranks
) -> TrainResult:
    """The training loop, stage by stage; each stage is a function below, in this order, and
    takes the state it needs: ``training`` (model, optimizer, schedule: built once) and
    ``state`` (epoch, history, best: what checkpoints save)."""
    training = build_training(cfg, features, splits, device, ranks)
    state = resume_or_start(cfg, training, features, splits, out / "checkpoint_last.pt", ranks)
    if ranks.main:
        prepare_out(cfg, out, training.config)
    training.train_model = wrap_for_ranks(training.model, device, ranks)
    console = make_console(stderr=True)
    if cfg.resume and not state.resumed and progress:
        console.print(f"resume: no checkpoint_last.pt in {out}; training from the start")
    for epoch in range(state.epoch, cfg.epochs):
        stats = train_one_epoch(cfg, training, features, splits.train, device, ranks, epoch, console, progress)
        final, select, eval_seconds = evaluate_epoch(cfg, training, features, splits, device, ranks)
        record, improved = record_epoch(state, epoch, stats, final, select, eval_seconds, training.scheduler)
        if ranks.main:
            save_epoch(training, state, out, improved, ranks)
        if progress:
            print_epoch(console, record, select, splits.eval_split)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return finish(training, state, features, out, ranks)


@dataclass
class Training:
    """What a run trains with, made once by ``build_training`` and read by every later stage."""

    inputs: tuple[str, ...]  # the FeatureSet arrays the head reads
    config: dict  # what config.json holds
    model: nn.Module  # the head itself: evaluated, checkpointed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    drop_last: bool  # the last batch of an epoch is dropped (it would hold one clip)
    cost: dict  # parameters and forward FLOPs per clip (spool.efficiency)
    memory: PeakMemory  # peak memory since the model was built
    device: torch.device
    train_model: nn.Module | None = None  # the model the step runs: DDP's wrapper of ``model`` under torchrun


@dataclass
class TrainState:
    """What the epochs accumulate, and what a checkpoint saves of it."""

    epoch: int  # epochs done
    history: list[EpochRecord]
    best: dict  # {"epoch", "top1", "chosen_on", "select_top1"} of checkpoint_best.pt
    final: dict | None  # the last epoch's eval metrics (a resumed finished run: the checkpoint's)
    chosen_on: str  # where the best epoch is chosen: "val-from-train", or the eval split itself
    resumed: bool = False


@dataclass
class EpochStats:
    loss_sum: float  # summed over the clips of the global batches
    correct: int
    seen: int  # clips
    seconds: float  # training time, loading included


def build_training(cfg, features: FeatureSet, splits: Splits, device, ranks: Ranks) -> Training:
    """The head, its optimizer and its learning-rate schedule, from the seed."""
    head_cfg = make_head_config(
        cfg,
        in_dim=features.dim,
        num_frames=features.num_frames,
        num_tokens=features.num_tokens,
        num_classes=features.num_classes,
    )
    config = _config_json(cfg, head_cfg, features, splits, device, ranks.world_size)

    if len(splits.train) < 2:
        raise TrainError(f"{cfg.store}: the train split holds {len(splits.train)} clip(s); training needs at least 2")
    torch.manual_seed(cfg.seed)  # weights and dropout; batch order comes from (seed, epoch)
    model = build_head(cfg.head, head_cfg, device=device)
    # What the head costs (spool.efficiency): counted once, on the meta device; memory from here on.
    cost = {"params": param_count(model), **forward_flops(cfg.head, head_cfg, num_frames=features.num_frames,
                                                          num_tokens=features.num_tokens)}  # fmt: skip
    memory = PeakMemory(device)
    if ranks.world_size > 1:
        # Statistics of the global batch, as one process computes them; same state_dict keys.
        sync_batchnorm(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    # A last batch of one clip is dropped: the heads' BatchNorm cannot normalise a single sample.
    drop_last = len(splits.train) % cfg.batch_size == 1
    steps_per_epoch = len(splits.train) // cfg.batch_size if drop_last else math.ceil(len(splits.train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, round(cfg.warmup * steps_per_epoch)) if cfg.warmup > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))
    return Training(
        HEAD_INPUTS[cfg.head], config, model, optimizer, scheduler, steps_per_epoch, drop_last, cost, memory, device
    )


def resume_or_start(
    cfg, training: Training, features: FeatureSet, splits: Splits, last_path: Path, ranks: Ranks
) -> TrainState:
    """With ``--resume`` and a checkpoint in ``out``: its weights, optimizer, schedule, RNG and
    history, once its options are checked against these. Otherwise epoch 0."""
    # The best epoch is chosen on the videos held out of train when there are some, else on the
    # eval split itself (optimistic: the choice and the reported number see the same videos).
    chosen_on = "val-from-train" if len(splits.select) else splits.eval_split
    state = TrainState(0, [], {"epoch": 0, "top1": -1.0, "chosen_on": chosen_on, "select_top1": None}, None, chosen_on)
    # Rank 0 reads the checkpoint and hands it to the others: every rank resumes from the same
    # one, and the other machines of a multi-node run need not see rank 0's --out.
    ckpt = ranks.broadcast(load_checkpoint(last_path) if ranks.main and cfg.resume and last_path.exists() else None)
    if ckpt is None:
        return state
    saved, wanted = ckpt["train"], asdict(cfg)
    diff = [option_diff(k, saved.get(k, TRAIN_DEFAULTS.get(k)), wanted.get(k)) for k in _diff_keys(saved, wanted)]
    if ckpt["store"].get("fingerprint") != features.fingerprint:
        diff.append(f"store fingerprint (saved {ckpt['store'].get('fingerprint')}, store has {features.fingerprint})")
    if diff:
        raise ResumeMismatchError(
            f"{last_path} was trained with other options; differing: {', '.join(diff)}. "
            "Resume with the same options, or train into a new --out."
        )
    saved_world = ckpt.get("world_size", 1)
    if cfg.dropout > 0 and saved_world != ranks.world_size:
        # Each rank draws its own dropout masks, so with dropout the run depends on the
        # number of processes; without, resuming with another number gives the same result.
        raise ResumeMismatchError(
            f"{last_path} was trained by {saved_world} process(es) with dropout {cfg.dropout}; its dropout masks "
            f"depend on the number of processes, and this run has {ranks.world_size}. Resume with "
            f"{saved_world} process(es) (torchrun --nnodes x --nproc-per-node), or train into a new --out."
        )
    training.model.load_state_dict(strip_compile_prefix(ckpt["model"]))
    try:
        training.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as err:  # parameter groups made by another Spool version
        raise ResumeMismatchError(
            f"{last_path}: its optimizer state does not fit this Spool's optimizer ({err}); "
            "it was written by another Spool version. Train into a new --out."
        ) from err
    training.scheduler.load_state_dict(ckpt["scheduler"])
    _set_rng_state(ckpt["rng"])
    history = [EpochRecord(**h) for h in ckpt["history"]]
    return TrainState(ckpt["epoch"], history, ckpt["best"], ckpt["eval"], chosen_on, resumed=True)


def prepare_out(cfg, out: Path, config: dict) -> None:
    """``out`` with this run's config.json (rank 0)."""
    # Made only now, once every option and the store have been checked: an argument error
    # leaves no empty run folder behind.
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    write_json(out / "config.json", config)


def wrap_for_ranks(model: nn.Module, device, ranks: Ranks) -> nn.Module:
    """The model the training step runs: ``model`` alone, or DDP's wrapper under torchrun."""
    if ranks.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one rank's epoch in a run of several processes (dropout masks)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train_one_epoch(
    cfg, training: Training, features: FeatureSet, train_clips: np.ndarray, device, ranks: Ranks, epoch: int,
    console, progress: bool,
) -> EpochStats:
    """One pass over the train split; each rank steps on its share of every global batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    model, optimizer, scheduler = training.train_model, training.optimizer, training.scheduler
    model.train()
    if ranks.world_size > 1:
        # Every rank draws dropout masks for its own clips: from its own seed, set per
        # epoch so that a resumed run draws the same masks.
        torch.manual_seed(_rank_seed(cfg.seed, epoch, ranks.rank))
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = Progress(
        TextColumn(f"epoch {epoch + 1}/{cfg.epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not (progress and sys.stderr.isatty()),
        transient=True,
    )
    with bar:
        task = bar.add_task("train", total=training.steps_per_epoch, info="")
        batches = features.batches(
            train_clips, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, device=device,
            drop_last=training.drop_last, shard=ranks.shard,
        )  # fmt: skip
        for step, batch in enumerate(batches):  # this rank's share of each global batch
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = _forward(model, training.inputs, batch)
            share_loss = F.cross_entropy(
                logits.float(), batch["label"], label_smoothing=cfg.label_smoothing, reduction="sum"
            )
            share_correct = (logits.argmax(1) == batch["label"]).sum()
            # loss sum, correct and clips of the global batch (each rank's share may be empty)
            totals = torch.stack([share_loss.detach().double(), share_correct.double(),
                                  share_loss.new_tensor(len(batch["label"]), dtype=torch.float64)])  # fmt: skip
            batch_loss, batch_correct, n = ranks.sum(totals).tolist()
            batch_loss /= n
            if not math.isfinite(batch_loss):
                raise NonFiniteLossError(
                    f"loss became {batch_loss} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {scheduler.get_last_lr()[0]:.3g}); no checkpoint was written for this epoch. "
                    "Check the features for inf/NaN (float16 overflow) or lower --lr."
                )
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: scaled by world_size / n, their mean is the
            # gradient of the mean loss over the global batch, however unevenly it split.
            (share_loss * (ranks.world_size / n)).backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(training.model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += batch_loss * n
            correct += int(batch_correct)
            seen += int(n)
            bar.update(task, advance=1, info=f"loss {loss_sum / seen:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return EpochStats(loss_sum, correct, seen, time.perf_counter() - t0)


def evaluate_epoch(
    cfg, training: Training, features: FeatureSet, splits: Splits, device, ranks: Ranks
) -> tuple[dict, dict | None, float]:
    """Metrics on the eval split, on the videos held out of train (None without them), and the
    seconds the eval split took."""
    model, inputs = training.model, training.inputs
    t0 = time.perf_counter()
    final = evaluate(model, inputs, features, splits.eval, cfg.batch_size, device, ranks)
    eval_seconds = time.perf_counter() - t0  # evaluate ends with the logits on the CPU: synchronised
    select = evaluate(model, inputs, features, splits.select, cfg.batch_size, device, ranks) if len(splits.select) else None
    return final, select, eval_seconds


def record_epoch(
    state: TrainState, epoch: int, stats: EpochStats, final: dict, select: dict | None, eval_seconds: float, scheduler
) -> tuple[EpochRecord, bool]:
    """The epoch's record appended to the history, and whether it is the best epoch so far."""
    record = EpochRecord(
        epoch=epoch + 1,
        train_loss=stats.loss_sum / stats.seen,
        train_acc=stats.correct / stats.seen,
        eval_top1=final["top1"],
        eval_top5=final["top5"],
        eval_topk=final["top_k"]["accuracy"],
        lr=scheduler.get_last_lr()[0],
        clips_per_s=stats.seen / stats.seconds,
        select_top1=None if select is None else select["top1"],
        eval_videos_per_s=final["num_videos"] / eval_seconds,
    )
    state.history.append(record)
    state.epoch, state.final = epoch + 1, final
    best = state.best
    if select is None:
        improved = final["top1"] > best["top1"]
    else:
        improved = best.get("select_top1") is None or select["top1"] > best["select_top1"]
    if improved:
        state.best = {"epoch": epoch + 1, "top1": final["top1"], "chosen_on": state.chosen_on,
                      "select_top1": None if select is None else select["top1"]}  # fmt: skip
    return record, improved


def save_epoch(training: Training, state: TrainState, out: Path, improved: bool, ranks: Ranks) -> None:
    """checkpoint_last.pt, checkpoint_best.pt when the epoch is the best, and metrics.json (rank 0)."""
    t = training
    payload = _payload(t.model, t.optimizer, t.scheduler, state.epoch - 1, state.history, t.config, state.final, ranks)
    payload["best"] = state.best
    if improved:
        save_checkpoint(out / "checkpoint_best.pt", payload)
    save_checkpoint(out / "checkpoint_last.pt", payload)
    _write_metrics(out, state, training)


def _write_metrics(out: Path, state: TrainState, training: Training) -> None:
    epochs = [asdict(h) for h in state.history]
    efficiency = _efficiency(training.cost, state.history, training.memory, training.device)
    write_json(out / "metrics.json", {"epochs": epochs, "best": state.best, "final": state.final, "efficiency": efficiency})


def print_epoch(console, record: EpochRecord, select: dict | None, eval_split: str) -> None:
    held = "" if select is None else f"  val-from-train top-1 {select['top1']:.3f}"
    console.print(
        f"epoch {record.epoch}: loss {record.train_loss:.4f}  train acc {record.train_acc:.3f}{held}  "
        f"{eval_split} top-1 {record.eval_top1:.3f}  {record.clips_per_s:.0f} clips/s",
        highlight=False,
    )


def finish(training: Training, state: TrainState, features: FeatureSet, out: Path, ranks: Ranks) -> TrainResult:
    """metrics.json and the plots (rank 0); under torchrun, a check that the ranks agree."""
    if ranks.main:
        _write_metrics(out, state, training)
        plot_curves([asdict(h) for h in state.history], out / "learning_curves.png")
        plot_confusion(state.final["confusion_matrix"], features.class_names, out / "confusion_matrix.png")
    # DDP keeps the ranks' weights equal bit for bit; say so if they are not. This meeting also
    # holds every rank until rank 0's outputs are complete.
    if ranks.world_size > 1 and len(set(ranks.gather(state_digest(training.model)))) > 1:
        raise TrainError(
            f"the {ranks.world_size} processes ended with different weights (a bug in Spool's distributed "
            f"training); {out} holds rank 0's"
        )
    return TrainResult(out=out, history=state.history, final=state.final, best=state.best, config=training.config)


def _efficiency(cost: dict, history: list[EpochRecord], memory: PeakMemory, device) -> dict:
    """metrics.json's "efficiency": parameters and forward FLOPs per clip (spool.efficiency),
    throughput as the mean over the epochs (of the run so far; loading included), and the
    peak memory of this process since the run (or its resumed part) started."""
    eval_rates = [h.eval_videos_per_s for h in history if h.eval_videos_per_s is not None]
    return {
        **cost,
        "train_clips_per_s": float(np.mean([h.clips_per_s for h in history])) if history else None,
        "eval_videos_per_s": float(np.mean(eval_rates)) if eval_rates else None,
        **memory.read(),
        "device": str(device),
    }


def _payload(model, optimizer, scheduler, epoch: int, history, config: dict, final: dict, ranks: Ranks) -> dict:
    return {
        "model": strip_compile_prefix(model.state_dict()),  # the bare model's keys, never DDP's "module."
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch + 1,
        # several processes reseed per epoch and rank (_rank_seed); alone the stream goes on
        "rng": _rng_state() if ranks.world_size == 1 else {"torch": torch.get_rng_state()},
        "world_size": ranks.world_size,
        "history": [asdict(h) for h in history],
        "head": config["head"],
        "head_config": config["head_config"],
        "train": config["train"],
        "store": config["store"],
        "eval": final,
    }
