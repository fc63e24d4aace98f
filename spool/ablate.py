"""``spool ablate grid.yaml``: a grid of temporal heads trained on feature caches.

    grid = load_grid("grid.yaml")
    result = run_ablation(grid)          # out/results.csv, results.json, summary.md, plots/

Each store (one, or several on a ``store`` axis: the same videos through other backbones)
is opened once and its val split drawn once (``split-seed``); the features are loaded once
per (store, token_pool) and handed to every ``train_head`` of that group, in this process
or, with ``jobs > 1``, once per worker process that meets the group. A process holds one
group's features at a time. Each run writes to
``out/runs/<cell-id>-seed<k>`` and is complete when its ``result.json`` exists (written
atomically, last): a re-run skips complete runs and continues half-done ones from their
``checkpoint_last.pt`` (train_head's resume), so an ablation killed at any moment finishes
with the results of an uninterrupted one. A failing run is recorded in its ``error.json``
and the row's ``error`` column; the others go on. A re-run keeps failed runs as failed (as
``spool extract`` keeps failed videos) unless ``retry_failed`` asks to train them again.

One process at a time works on an ``out`` folder: ``run_ablation`` holds ``out/.spool-ablate.lock``
(a flock the kernel drops when the process dies), and a second one is refused naming the first.

With ``launcher: submitit`` (spool.launcher) each run is a cluster job instead, trained by
the same ``spool.runs.train_run`` into the same folders, so the results do not depend on the
launcher. The dependency runs one way: ablate uses the launchers, both use ``spool.runs``.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from spool.files import Busy, ProcessLock, write_json
from spool.grid import UNUSED, Cell, GridConfig, GridError, columns, expand, key_name, load_grid, train_config
from spool.runs import Run, is_complete, is_failed, load_group_features, read_record, train_run
from spool.train import TrainConfig

__all__ = [
    "AblationResult",
    "GridConfig",
    "GridError",
    "load_grid",
    "plan_ablation",
    "print_plan",
    "print_summary",
    "run_ablation",
]

# differ between runs of the same config (throughput, memory, time)
TIMING_COLUMNS = ("clips_per_s", "eval_videos_per_s", "peak_memory_mb", "wall_s")
LOCK = ".spool-ablate.lock"  # in out: held by the one process working on it
RETRY_HINT = "`spool ablate --retry-failed` trains them again"


@dataclass(frozen=True)
class StoreInfo:
    """What a grid needs of one store, read once when planning."""

    path: str
    fingerprint: str | None
    backbone: str | None
    shapes: dict  # in_dim, num_frames, num_classes: for make_head_config
    num_tokens: int
    videos: dict  # video_id, label, split, done: arrays, for comparing the stores of an axis
    split_videos: dict  # "train", "eval", "select" -> the video ids of the drawn split


@dataclass
class AblationResult:
    grid: GridConfig
    cells: list[Cell]
    runs: list[Run]
    stores: dict[str, StoreInfo] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # one per run, in grid order then seed
    summary: list[dict] = field(default_factory=list)  # one per cell, best first
    trained: int = 0  # runs finished by this invocation
    skipped: int = 0  # runs already complete
    failed: int = 0  # runs that raised (this invocation)
    kept_failed: int = 0  # runs that failed in an earlier invocation, not retried (no retry_failed)
    retried: int = 0  # runs that failed in an earlier invocation, trained again (retry_failed)
    pending: list[Run] = field(default_factory=list)  # the runs this invocation trains
    dry_run: bool = False

    @property
    def out(self) -> Path:
        return Path(self.grid.out)


# --- planning and validation --------------------------------------------------------------


def plan_ablation(grid: GridConfig) -> tuple[list[Cell], list[Run]]:
    """Every cell and run of the grid, each cell's TrainConfig and head config built with the
    store's shapes: raises GridError (naming the cell) before anything is trained."""
    cells, runs, _ = _plan(grid)
    return cells, runs


def _plan(grid: GridConfig) -> tuple[list[Cell], list[Run], dict[str, StoreInfo]]:
    from spool.data import FeatureSetError, pooled_num_tokens
    from spool.train import TrainError, make_head_config

    stores = {path: read_store(grid, path) for path in grid.stores}
    check_same_videos(list(stores.values()), source=_source(grid))
    cells = expand(grid, {path: info.fingerprint for path, info in stores.items()})
    runs = []
    for cell in cells:
        cfg = train_config(grid, cell.head, cell.overrides)
        info = stores[cfg.store]
        where = f"{cell.origin}" + (f" with base {_fmt_overrides(grid.base)}" if grid.base else "")
        try:
            make_head_config(cfg, num_tokens=pooled_num_tokens(info.num_tokens, cfg.token_pool), **info.shapes)
            if not 0.0 < cfg.val_fraction < 1.0:
                raise GridError(f"val-fraction must be in (0, 1), got {cfg.val_fraction}")
            if cfg.dropout >= 1.0:
                raise GridError(f"dropout must be in [0, 1), got {cfg.dropout}")
        except (TrainError, FeatureSetError, ValueError) as err:
            raise GridError(f"{_source(grid)}{where}: {err}") from None
        for seed in grid.seeds:
            run_dir = str(Path(grid.out) / "runs" / f"{cell.id}-seed{seed}")
            runs.append(Run(cell, seed, run_dir, train_config(grid, cell.head, cell.overrides, seed=seed, out=run_dir)))
    return cells, runs, stores


def read_store(grid: GridConfig, path: str) -> StoreInfo:
    """Open one store of the grid, draw its split (the one every run on it uses) and keep
    what planning and the results need; GridError when it cannot be opened or split."""
    from spool.data import FeatureSetError, assign_splits
    from spool.stores import DONE, StoreError, open_store

    key = "store" if len(grid.stores) == 1 else "grid.store"
    try:
        store = open_store(path, mode="r")
    except (StoreError, FileNotFoundError) as err:
        raise GridError(f"{key}: {err}") from None
    with store:
        t, v = store.clips(), store.videos()
        val_fraction = grid.base.get("val_fraction", TrainConfig.val_fraction)
        val_from_train = grid.base.get("val_from_train", TrainConfig.val_from_train)
        try:  # the one split every run trains and evaluates on (load_features draws the same)
            splits = assign_splits(t.split, t.video_index, t.label, t.done, val_fraction=val_fraction,
                                   seed=grid.split_seed, val_from_train=val_from_train,
                                   class_names=store.class_names)  # fmt: skip
        except (FeatureSetError, ValueError) as err:
            raise GridError(f"{_source(grid)}{path}: cannot split the store for training: {err}") from None
        ids = np.asarray(v.video_id, dtype=object)
        return StoreInfo(
            path=path,
            fingerprint=store.attrs.get("fingerprint"),
            backbone=store.attrs.get("backbone"),
            shapes=dict(in_dim=store.dim, num_frames=store.num_frames, num_classes=len(store.class_names)),
            num_tokens=store.num_tokens,
            videos={"video_id": ids, "label": np.asarray(v.label), "split": np.asarray(v.split),
                    "done": np.asarray(v.status) == DONE, "class_names": list(store.class_names)},  # fmt: skip
            split_videos={name: set(ids[np.unique(t.video_index[clips])])
                          for name, clips in (("train", splits.train), ("eval", splits.eval), ("select", splits.select))},
        )  # fmt: skip


def check_same_videos(stores: list[StoreInfo], source: str = "") -> None:
    """The stores of a store axis must hold the same videos, labels and split (they may differ
    in backbone, width and token count): GridError naming the first difference."""
    if len(stores) < 2:
        return
    a = stores[0]
    for b in stores[1:]:
        where = f"{source}grid.store: {a.path} and {b.path} do not hold the same videos"
        va, vb = a.videos, b.videos
        if va["class_names"] != vb["class_names"]:
            c = next((i for i, (x, y) in enumerate(zip(va["class_names"], vb["class_names"])) if x != y),
                     min(len(va["class_names"]), len(vb["class_names"])))  # fmt: skip
            raise GridError(f"{where}: their classes differ first at class {c} "
                            f"({_at(va['class_names'], c)} vs {_at(vb['class_names'], c)})")  # fmt: skip
        if len(va["video_id"]) != len(vb["video_id"]):
            raise GridError(f"{where}: {len(va['video_id'])} videos vs {len(vb['video_id'])}")
        for key, what in (("video_id", "video id"), ("label", "label"), ("split", "split code"), ("done", "finished")):
            diff = np.flatnonzero(va[key] != vb[key])
            if len(diff):
                i = int(diff[0])
                raise GridError(f"{where}: video {i} ({va['video_id'][i]}) differs in its {what}: "
                                f"{_plain(va[key][i])!r} in {a.path}, {_plain(vb[key][i])!r} in {b.path}")  # fmt: skip
        for name in ("train", "eval", "select"):
            moved = sorted(a.split_videos[name] ^ b.split_videos[name])
            if moved:
                raise GridError(f"{where}: their drawn splits differ; video {moved[0]} is in the {name} split of "
                                f"{a.path if moved[0] in a.split_videos[name] else b.path} only (stores with other "
                                "clips per video draw other splits: give the videos a split with "
                                "`spool extract --split-file`)")  # fmt: skip


def _at(names: list, i: int) -> str:
    return repr(names[i]) if i < len(names) else "none"


def _plain(value):
    """A numpy scalar as the Python value it holds (1, not np.int32(1)), for messages."""
    return value.item() if isinstance(value, np.generic) else value


def _source(grid: GridConfig) -> str:
    return f"{grid.source}: " if grid.source else ""


def _fmt_overrides(ov: dict) -> str:
    return ", ".join(f"{key_name(k)}={v}" for k, v in ov.items())


# --- running ----------------------------------------------------------------------------


def _group(run: Run) -> tuple[str, int]:
    """The runs that share one FeatureSet: same store, same token_pool."""
    return run.cfg.store, run.cfg.token_pool


# A worker process holds one FeatureSet, that of its current (store, token_pool) group; the
# runs reach the workers sorted by group, so a worker never comes back to a group it left.
_WORKER: dict[str, Any] = {}


def _worker_init(grid: GridConfig, heads_by_group: dict, device: str | None, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(grid=grid, heads=heads_by_group, device=device, features={})


def _worker_run(run: Run) -> dict:
    group = _group(run)
    held = _WORKER["features"]
    if group not in held:
        for features in held.values():  # one group's features at a time
            features.store.close()
        held.clear()
        held[group] = load_group_features(_WORKER["grid"], *group, _WORKER["heads"][group], _WORKER["device"])
    if _WORKER["device"] is not None:
        run = replace(run, cfg=replace(run.cfg, device=_WORKER["device"]))
    return train_run(run, held[group])


def run_ablation(
    grid: GridConfig, *, jobs: int = 1, dry_run: bool = False, progress: bool = True, retry_failed: bool = False
) -> AblationResult:
    """Validate every cell, then train the runs that are not complete and write the results.

    ``jobs > 1`` trains in that many worker processes (spawned; each loads the features
    once per token_pool it meets; on a machine with several GPUs and ``device: auto`` worker
    i uses cuda:i mod n). With ``grid.launcher.name == "submitit"`` each run is a cluster job
    (spool.launcher.run_jobs) and results.csv, results.json and summary.md are rewritten as
    jobs end. ``dry_run`` validates and plans without training or writing. Runs that failed
    in an earlier invocation stay failed unless ``retry_failed``. Raises GridError while
    another process works on ``grid.out``."""
    if jobs < 1:
        raise GridError(f"jobs must be >= 1, got {jobs}")
    submitit = grid.launcher.name == "submitit"
    if submitit and jobs != 1:
        raise GridError(f"jobs: --jobs {jobs} is for the local launcher; the submitit launcher runs one job per run "
                        "(launcher.array-parallelism limits how many run at once)")  # fmt: skip
    cells, runs, stores = _plan(grid)
    result = AblationResult(grid=grid, cells=cells, runs=runs, stores=stores, dry_run=dry_run)
    _find_pending(result, retry_failed)
    if dry_run:
        result.rows = [_row(result, r, read_record(r)) for r in runs]
        return result

    from spool.progress import make_console

    if submitit and result.pending:
        from spool.launcher import require_submitit

        require_submitit()  # a missing package is said before anything is written
    console = make_console(stderr=True)
    out = Path(grid.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_out(out)
    try:
        _find_pending(result, retry_failed)  # again: a process before ours may have finished runs meanwhile
        _run_pending(result, result.pending, jobs, console, progress)
    finally:
        lock.release()
    return result


def _find_pending(result: AblationResult, retry_failed: bool) -> None:
    """The runs to train: not complete, and not failed earlier unless ``retry_failed``."""
    failed_before = [r for r in result.runs if is_failed(r)]
    result.pending = [r for r in result.runs if not is_complete(r) and (retry_failed or not is_failed(r))]
    result.skipped = sum(is_complete(r) for r in result.runs)
    result.kept_failed = 0 if retry_failed else len(failed_before)
    result.retried = len(failed_before) if retry_failed else 0


def lock_out(out: Path) -> ProcessLock:
    """Hold ``out/.spool-ablate.lock``, or raise GridError naming the process that holds it:
    two ablations in one folder would train the same runs twice and race on results.csv."""
    try:
        return ProcessLock(out / LOCK, f"PID {os.getpid()} ({' '.join(sys.argv) or 'python'})\n")
    except Busy as busy:
        raise GridError(
            f"{out} is in use by another `spool ablate`, {busy.holder} (lock file {busy.path}); wait for it to "
            "finish or stop it, then re-run: complete runs are kept"
        ) from None


def _run_pending(result: AblationResult, pending: list[Run], jobs: int, console, progress: bool) -> None:
    grid, cells, runs, out = result.grid, result.cells, result.runs, result.out
    submitit = grid.launcher.name == "submitit"
    write_json(out / "grid.json", grid.to_json())
    if progress:
        earlier = ""
        if result.kept_failed:
            earlier = f"; {result.kept_failed} failed earlier and are kept as failed ({RETRY_HINT})"
        elif result.retried:
            earlier = f"; {result.retried} failed earlier and are trained again (--retry-failed)"
        console.print(f"{len(cells)} cells x {len(grid.seeds)} seeds = {len(runs)} runs; "
                      f"{result.skipped} already complete{earlier}")  # fmt: skip

    done = 0

    def report(run: Run, record: dict) -> None:
        nonlocal done
        done += 1
        result.trained += record["status"] == "ok"
        result.failed += record["status"] != "ok"
        if progress:
            what = f"top-1 {record['top1']:.3f}" if record["status"] == "ok" else f"[red]failed[/] {record['error']}"
            wall = f" ({record['wall_s']:.1f}s)" if record.get("wall_s") is not None else ""
            console.print(f"[{done}/{len(pending)}] {run.cell.id} seed {run.seed}: {what}{wall}")

    by_group: dict[tuple[str, int], list[Run]] = defaultdict(list)  # in order of first appearance
    for r in pending:
        by_group[_group(r)].append(r)
    heads_by_group = {g: {r.cfg.head for r in rs} for g, rs in by_group.items()}
    if submitit and pending:
        from spool.launcher import run_jobs

        def update() -> None:  # results so far, unfinished runs as "pending" (plots at the end)
            _collect_rows(result)
            write_results(result, plots=False)

        run_jobs(grid, pending, report, on_update=update, console=console, progress=progress)
    elif jobs == 1:
        for (store, pool), group in by_group.items():  # one group's features in memory at a time
            features = load_group_features(grid, store, pool, heads_by_group[store, pool])
            try:
                for r in group:
                    report(r, train_run(r, features))
            finally:
                features.store.close()
    elif pending:
        _run_parallel(grid, [r for rs in by_group.values() for r in rs], heads_by_group, jobs, report)

    _collect_rows(result)
    write_results(result)
    if progress:
        print_summary(result, console)
        if result.kept_failed:
            console.print(f"{result.kept_failed} runs failed in an earlier invocation and were kept as failed; {RETRY_HINT}")
        console.print(f"results in {out}/results.csv, summary.md, plots/")


def _run_parallel(grid, pending, heads_by_group, jobs, report) -> None:
    import multiprocessing

    import torch

    ngpu = torch.cuda.device_count() if grid.device == "auto" else 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    # One pool per device so that each worker keeps its GPU; CPU-only: one pool, no device pinning.
    devices = [f"cuda:{i}" for i in range(ngpu)] if ngpu else [None]
    per_device = [max(1, jobs // len(devices) + (i < jobs % len(devices))) for i in range(len(devices))]
    executors = [
        ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init, initargs=(grid, heads_by_group, d, threads))
        for d, n in zip(devices[:jobs], per_device)
    ]
    try:
        futures = {}
        for i, r in enumerate(pending):
            futures[executors[i % len(executors)].submit(_worker_run, r)] = r
        for fut in as_completed(futures):
            report(futures[fut], fut.result())
    finally:
        for ex in executors:
            ex.shutdown(cancel_futures=True)


# --- results ------------------------------------------------------------------------------


def _collect_rows(result: AblationResult) -> None:
    result.rows = [_row(result, r, read_record(r)) for r in result.runs]
    result.summary = summarize(result.grid, result.cells, result.rows)


def _row(result: AblationResult, run: Run, record: dict) -> dict:
    grid = result.grid
    row = {"cell": run.cell.id, "kind": run.cell.kind, "head": run.cell.head}
    unused = UNUSED.get(run.cell.head, ())
    for f in (f for f in columns(grid) if f != "head"):  # the head has its column already
        shown = run.cell.kind != "baseline" and f not in unused or f == "store"
        row[key_name(f)] = getattr(run.cfg, f) if shown else ""
    row.update(seed=run.seed, status=record["status"], top1=record.get("top1"), top5=record.get("top5"))
    info = result.stores.get(run.cfg.store)
    row.update(params=record.get("params"), flops=record.get("flops"),
               backbone=info.backbone if info else None, fingerprint=info.fingerprint if info else None,
               error=record.get("error", ""))  # fmt: skip
    row.update({k: record.get(k) for k in TIMING_COLUMNS})
    return row


def summarize(grid: GridConfig, cells: list[Cell], rows: list[dict]) -> list[dict]:
    """Per cell: mean and std (population, over the seeds that finished) of top-1/top-5,
    params, FLOPs per clip, mean train clips/s and eval videos/s, the largest peak memory,
    and the store's backbone; sorted by mean top-1 (unfinished cells last); the best
    non-baseline cell gets ``best=True``."""
    by_cell = defaultdict(list)
    for row in rows:
        by_cell[row["cell"]].append(row)
    summary = []
    for cell in cells:
        ok = [r for r in by_cell[cell.id] if r["status"] == "ok"]
        top1 = [r["top1"] for r in ok]
        top5 = [r["top5"] for r in ok if r["top5"] is not None]
        summary.append({
            "cell": cell.id, "kind": cell.kind, "head": cell.head,
            "values": {key_name(k): v for k, v in cell.overrides.items()},
            "seeds": len(ok), "failed": sum(r["status"] == "failed" for r in by_cell[cell.id]),
            "top1_mean": float(np.mean(top1)) if top1 else None, "top1_std": float(np.std(top1)) if top1 else None,
            "top5_mean": float(np.mean(top5)) if top5 else None, "top5_std": float(np.std(top5)) if top5 else None,
            "params": ok[0]["params"] if ok else None,
            "flops": ok[0].get("flops") if ok else None,
            "clips_per_s": float(np.mean([r["clips_per_s"] for r in ok])) if ok else None,
            "eval_videos_per_s": _mean([r.get("eval_videos_per_s") for r in ok]),
            "peak_memory_mb": max([r["peak_memory_mb"] for r in ok if r.get("peak_memory_mb") is not None], default=None),
            "backbone": by_cell[cell.id][0].get("backbone") if by_cell[cell.id] else None,
            "best": False,
        })  # fmt: skip
    summary.sort(key=lambda s: -math.inf if s["top1_mean"] is None else s["top1_mean"], reverse=True)
    heads = [s for s in summary if s["kind"] != "baseline" and s["top1_mean"] is not None]
    if heads:
        heads[0]["best"] = True
    return summary


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]  # runs from before a column existed have none
    return float(np.mean(values)) if values else None


def write_results(result: AblationResult, *, plots: bool = True) -> None:
    """results.csv, results.json, summary.md and plots/ in ``out``; each replaced atomically."""
    out = result.out
    rows = result.rows
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, out / "results.csv")
    write_json(out / "results.json", {"grid": result.grid.to_json(), "runs": rows, "cells": result.summary})
    tmp = out / "summary.md.tmp"
    tmp.write_text(summary_markdown(result))
    os.replace(tmp, out / "summary.md")
    if plots:
        plot_results(result, out / "plots")


def _pm(mean, std, n) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def _summary_rows(result: AblationResult) -> tuple[list[str], list[list[str]]]:
    several = len(result.grid.stores) > 1
    header = ["", "cell", "head", *(["backbone"] if several else []), "top-1 %", "top-5 %", "seeds", "params",
              "GFLOPs/clip", "train clips/s", "eval videos/s", "peak MB"]  # fmt: skip
    body = []

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for s in result.summary:
        seeds = f"{s['seeds']}/{len(result.grid.seeds)}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        body.append([
            "★" if s["best"] else "", s["cell"], s["head"], *([str(s.get("backbone"))] if several else []),
            _pm(s["top1_mean"], s["top1_std"], s["seeds"]), _pm(s["top5_mean"], s["top5_std"], s["seeds"]), seeds,
            num(s["params"], ","), "-" if s.get("flops") is None else _gflops(s["flops"]),
            num(s["clips_per_s"], ".0f"), num(s.get("eval_videos_per_s"), ".0f"), num(s.get("peak_memory_mb"), ".0f"),
        ])  # fmt: skip
    return header, body


def _gflops(flops: int) -> str:
    g = flops / 1e9
    return f"{g:.3g}" if g >= 0.01 else f"{g:.2e}"  # tiny test heads stay readable


def summary_markdown(result: AblationResult) -> str:
    header, body = _summary_rows(result)
    g = result.grid
    stores = ", ".join(
        f"`{p}`" + (f" (backbone {i.backbone}, fingerprint {i.fingerprint})" if (i := result.stores.get(p)) else "")
        for p in g.stores
    )
    text = 3 + (len(g.stores) > 1)  # left-aligned columns
    lines = [
        f"# Ablation {g.out}",
        "",
        f"Store{'s' if len(g.stores) > 1 else ''} {stores}; {len(result.cells)} cells x {len(g.seeds)} seeds "
        f"(seeds {list(g.seeds)}); top-1/top-5 are video-level accuracy on the eval split, mean ± std (population) "
        "over seeds; ★ marks the best non-baseline cell. GFLOPs: forward, per clip (masked attention counted on "
        "the pairs its mask allows); clips/s and videos/s: mean over epochs and seeds, loading included; "
        "peak MB: the largest over seeds (see docs/ablate.md for what it measures on this device).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < text else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    failed = [r for r in result.rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs (a re-run keeps them as failed; " + RETRY_HINT + "):", ""]
        lines += [f"- {r['cell']} seed {r['seed']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def print_summary(result: AblationResult, console=None) -> None:
    """The per-cell table (mean ± std over seeds, best first, ★ = best) as a rich table."""
    from rich.table import Table

    from spool.progress import make_console

    console = console or make_console()
    header, body = _summary_rows(result)
    table = Table(title=f"ablation {result.grid.out}")
    text = 3 + (len(result.grid.stores) > 1)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < text else "right", no_wrap=i == 1)
    for r, s in zip(body, result.summary):
        table.add_row(*r, style="bold green" if s["best"] else ("dim" if s["kind"] == "baseline" else None))
    console.print(table)


def print_plan(result: AblationResult, console=None) -> None:
    """The dry-run listing: every cell with its overrides and how many of its runs are complete."""
    from rich.table import Table

    from spool.progress import make_console

    console = console or make_console()
    g = result.grid
    kept = f", {result.kept_failed} failed (kept; --retry-failed trains them)" if result.kept_failed else ""
    table = Table(title=f"{len(result.cells)} cells x {len(g.seeds)} seeds = {len(result.runs)} runs "
                  f"({result.skipped} complete{kept}, {len(result.pending)} to train)")  # fmt: skip
    for col in ("#", "cell", "head", "overrides", "done"):
        table.add_column(col)
    done = defaultdict(int)
    for run in result.runs:
        done[run.cell.id] += is_complete(run)
    for i, c in enumerate(result.cells, 1):
        table.add_row(str(i), c.id, c.head, _fmt_overrides(c.overrides) or "-", f"{done[c.id]}/{len(g.seeds)}")
    console.print(table)
    if g.base:
        console.print(f"base: {_fmt_overrides(g.base)}")
    if g.launcher.name == "submitit":
        from spool.launcher import plan_lines

        for line in plan_lines(g, result.pending):
            console.print(line, markup=False, highlight=False)


# --- plots --------------------------------------------------------------------------------


def plot_results(result: AblationResult, folder: Path) -> list[Path]:
    """top1_vs_<axis>.png per grid axis (one line per value of the next axis, mean over the
    rest, error bars = std over seeds), and one point per cell against cost:
    top1_vs_params.png, top1_vs_flops.png (forward FLOPs per clip), top1_vs_throughput.png
    (train clips/s) and top1_vs_eval_throughput.png (eval videos/s); there a marker per head
    and the cells named in a legend beside the axes, so no label covers a point or another
    label. Each plot draws the baselines and chance as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    chance = _chance(result.grid.store)
    written = []
    figures = [(f"top1_vs_{key_name(f)}", axis_figure(result, key_name(f), chance)) for f, _ in result.grid.axes]
    figures += [
        ("top1_vs_params", scatter_figure(result, "params", "parameters", chance)),
        ("top1_vs_flops", scatter_figure(result, "flops", "forward FLOPs per clip", chance)),
        ("top1_vs_throughput", scatter_figure(result, "clips_per_s", "train clips/s", chance)),
        ("top1_vs_eval_throughput", scatter_figure(result, "eval_videos_per_s", "eval videos/s", chance)),
    ]
    for name, fig in figures:
        written.append(folder / f"{name}.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")  # "tight": the legend beside the axes is kept
        plt.close(fig)
    return written


def _chance(store_path: str) -> float | None:
    """Top-1 of a uniform guess, 1 / classes, or None when the store cannot be read."""
    from spool.stores import StoreError, open_store

    try:
        with open_store(store_path, mode="r") as store:
            return 1.0 / max(1, len(store.class_names))
    except (StoreError, OSError):
        return None


def _reference_lines(ax, result: AblationResult, chance: float | None) -> None:
    """Baselines (mean over seeds) and chance, as horizontal lines across the plot."""
    styles = iter(["--", "-.", (0, (5, 1, 1, 1)), (0, (3, 1))])
    for s in result.summary:
        if s["kind"] == "baseline" and s["top1_mean"] is not None:
            ax.axhline(100 * s["top1_mean"], color="0.35", linestyle=next(styles, "--"), linewidth=1,
                       label=f"{s['head']} (baseline)")  # fmt: skip
    if chance is not None:
        ax.axhline(100 * chance, color="0.6", linestyle=":", linewidth=1, label=f"chance ({100 * chance:.1f}%)")


def _outside_legend(ax, fontsize: float = 7) -> None:
    # beside the axes, not over the data: labels never cover points or each other
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def axis_figure(result: AblationResult, axis: str, chance: float | None = None):
    """Mean top-1 against one grid axis, a line per value of the next axis; error bars: the std
    over seeds of the per-seed mean (over the other axes)."""
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r["status"] == "ok" and r["kind"] == "grid"]
    axes = [key_name(f) for f, _ in result.grid.axes]
    values = {key_name(f): list(v) for f, v in result.grid.axes}
    other = axes[(axes.index(axis) + 1) % len(axes)] if len(axes) > 1 else None
    lines = values[other] if other else [None]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = values[axis]
    width = 0.08 * (len(lines) - 1)  # lines side by side at each x, so error bars do not hide each other
    for n, line in enumerate(lines):
        mean, std = [], []
        for x in xs:
            # a row with no value for `other` (an option its head does not read) belongs to every line
            group = [r for r in rows if r[axis] == x and (other is None or r[other] in (line, ""))]
            per_seed = [np.mean([r["top1"] for r in group if r["seed"] == seed]) for seed in sorted({r["seed"] for r in group})]
            mean.append(100 * np.mean(per_seed) if per_seed else np.nan)
            std.append(100 * np.std(per_seed) if len(per_seed) > 1 else 0.0)
        offset = (n / max(1, len(lines) - 1) - 0.5) * width if len(lines) > 1 else 0.0
        ax.errorbar(np.arange(len(xs)) + offset, mean, yerr=std, marker="o", capsize=3,
                    label=f"{other}={line}" if other else "grid")  # fmt: skip
    _reference_lines(ax, result, chance)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(axis)
    ax.set_ylabel(f"top-1 % (mean ± std over {len(result.grid.seeds)} seeds)")
    _outside_legend(ax)
    fig.tight_layout()
    return fig


# A throughput axis spanning more than this ratio is drawn on a log scale: a fast baseline
# would otherwise press every head into one corner.
LOG_SPAN = 20.0


# one marker per head, so the heads stay apart in the cost plots whatever the colours
HEAD_MARKERS = {"spool": "o", "full": "^", "factorized": "v", "mean-linear": "s", "attentive-probe": "D"}


def scatter_figure(result: AblationResult, key: str, label: str, chance: float | None = None):
    """Mean top-1 (± std over seeds) against ``key`` ("params", "flops", "clips_per_s" or
    "eval_videos_per_s"), one point per cell, a marker per head (``HEAD_MARKERS``; the best
    cell larger, edged in black); the legend beside the axes names them."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    cells = [s for s in result.summary if s["top1_mean"] is not None and s.get(key) is not None]
    colors = plt.get_cmap("tab20" if len(cells) > 10 else "tab10")
    for n, s in enumerate(cells):
        marker = HEAD_MARKERS.get(s["head"], "o")
        # no text on the axes: cells are told apart by colour and marker, named in the legend
        ax.errorbar(s[key], 100 * s["top1_mean"], yerr=100 * (s["top1_std"] or 0.0), marker=marker,
                    markersize=9 if s["best"] else 6, markeredgecolor="black" if s["best"] else None, capsize=3,
                    linestyle="none", color=colors(n % colors.N),
                    label=f"{s['cell']} [{s['head']}]" + (" (best)" if s["best"] else ""))  # fmt: skip
    _reference_lines(ax, result, chance)
    spread = [s[key] for s in cells if s[key] > 0]
    if key in ("params", "flops") or (spread and max(spread) / min(spread) > LOG_SPAN):
        ax.set_xscale("log")
    ax.set_xlabel(label + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(f"top-1 % (mean ± std over {len(result.grid.seeds)} seeds)")
    _outside_legend(ax, fontsize=6)
    fig.tight_layout()
    return fig
