"""One run of an ablation grid, a cell at one seed: its folder, its record, and training it.

Both launchers train runs through this module, so the results do not depend on the launcher:
``spool.ablate`` in this process or in worker processes, ``spool.launcher`` as cluster jobs.
A run lives in ``out/runs/<cell-id>-seed<k>``; it is complete once its ``result.json``
exists (written atomically, last), and a run that raised keeps its ``error.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from spool.files import write_json
from spool.grid import Cell, GridConfig, train_config
from spool.train import TrainConfig

RESULT = "result.json"
ERROR = "error.json"


@dataclass(frozen=True)
class Run:
    cell: Cell
    seed: int
    dir: str
    cfg: TrainConfig


def is_complete(run: Run) -> bool:
    return (Path(run.dir) / RESULT).exists()


def is_failed(run: Run) -> bool:
    """The run's last attempt raised (it has an error.json and no result.json)."""
    return not is_complete(run) and (Path(run.dir) / ERROR).exists()


def read_record(run: Run) -> dict:
    """What result.json or error.json holds; ``{"status": "pending"}`` when neither exists."""
    d = Path(run.dir)
    for name in (RESULT, ERROR):
        if (d / name).exists():
            return json.loads((d / name).read_text())
    return {"status": "pending", "error": ""}


def record_failure(run: Run, error: str, wall_s: float | None) -> dict:
    """Write the run's error.json: it failed with ``error``. Returns the record."""
    record = {"status": "failed", "error": error, "wall_s": wall_s}
    write_json(Path(run.dir) / ERROR, record)
    return record


def load_group_features(grid: GridConfig, store: str, token_pool: int, heads: set[str], device: str | None = None):
    """One FeatureSet for every run on this store with this token_pool, holding the inputs all
    their heads read, on the split every run of the grid shares. The caller closes
    ``features.store``."""
    from spool.checkpoint import HEAD_INPUTS
    from spool.train import load_features

    inputs = tuple(sorted({i for h in heads for i in HEAD_INPUTS[h]}))
    cfg = train_config(grid, "spool", {"token_pool": token_pool, "store": store}, seed=grid.split_seed)
    if device is not None:
        cfg = replace(cfg, device=device)
    features, _ = load_features(cfg, inputs=inputs)
    return features


def train_run(run: Run, features) -> dict:
    """Train one run on the shared features; its record, written to result.json (or error.json)."""
    from spool.checkpoint import build_head
    from spool.train import train_head

    out = Path(run.dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = train_head(run.cfg, features=features, progress=False)
    except Exception as err:  # the grid's boundary: a failing run (OOM, NaN, ...) is recorded, the others go on
        return record_failure(run, f"{type(err).__name__}: {err}", time.perf_counter() - t0)
    model = build_head(run.cfg.head, result.config["head_config"], device="cpu")
    cost = json.loads((out / "metrics.json").read_text()).get("efficiency", {})  # train_head's (spool.efficiency)
    record = {
        "status": "ok",
        "error": "",
        "top1": result.final["top1"],
        "top5": result.final["top5"],
        "params": sum(p.numel() for p in model.parameters()),
        "flops": cost.get("flops"),  # forward, per clip
        "attention_flops": cost.get("attention_flops"),
        "attention_counted": cost.get("attention_counted"),
        "epochs": len(result.history),
        "best_epoch": result.best["epoch"],
        "clips_per_s": float(np.mean([h.clips_per_s for h in result.history])),
        "eval_videos_per_s": cost.get("eval_videos_per_s"),
        "peak_memory_mb": cost.get("peak_memory_mb"),
        "peak_memory_of": cost.get("peak_memory_of"),
        "wall_s": time.perf_counter() - t0,  # of this invocation's part of the run
        "store": {"path": run.cfg.store, "backbone": features.store.attrs.get("backbone"),
                  "fingerprint": features.fingerprint},  # fmt: skip
        "config": asdict(run.cfg),
    }
    write_json(out / RESULT, record)  # last: the run is complete once this file exists
    (out / ERROR).unlink(missing_ok=True)
    return record
