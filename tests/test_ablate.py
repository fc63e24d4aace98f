from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_data import make_store

import spool.train
from spool.ablate import TIMING_COLUMNS, load_grid, print_plan, run_ablation
from spool.grid import GridError, expand, parse_grid

BASE = {"heads": 2, "dim": 8, "depth": 1, "epochs": 2, "batch-size": 8, "lr": "3e-3", "warmup": 0.5}
GRID = {
    "base": BASE,
    "grid": {"lookahead": [0, 1], "range": [1, 2]},
    "seeds": [0, 1],
    "baselines": ["mean-linear"],
    "workers": 0,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "feats.zarr"
    make_store(path, num_videos=10, num_classes=2, T=4, L=4, D=8, signal=2.0, order_signal=1.0).close()
    return str(path)


def write_grid(path: Path, store: str, out: Path, **changes) -> Path:
    data = {"store": store, "out": str(out), **GRID, **changes}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_csv(path: Path, *, timing: bool = False) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not timing:
        for r in rows:
            for k in TIMING_COLUMNS:
                del r[k]
    return rows


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """The uninterrupted ablation of GRID: 5 cells x 2 seeds."""
    tmp = tmp_path_factory.mktemp("reference")
    grid = load_grid(write_grid(tmp / "grid.yaml", store, tmp / "out"))
    return run_ablation(grid, progress=False)


def test_grid_runs_end_to_end(reference):
    out = reference.out
    rows = read_csv(out / "results.csv", timing=True)
    assert len(rows) == 10 and reference.trained == 10 and reference.failed == 0
    # grid order (first axis outermost), then seed; the baseline last
    assert [(r["lookahead"], r["range"], r["seed"]) for r in rows[:8]] == [
        (la, rg, s) for la in "01" for rg in "12" for s in "01"
    ]
    assert [(r["head"], r["lookahead"], r["seed"]) for r in rows[8:]] == [("mean-linear", "", "0"), ("mean-linear", "", "1")]
    assert rows[0]["cell"].startswith("lookahead0-range1-")
    assert all(r["status"] == "ok" and 0 <= float(r["top1"]) <= 1 and int(r["params"]) > 0 for r in rows)
    assert all(float(r["clips_per_s"]) > 0 and float(r["wall_s"]) > 0 for r in rows)
    # each run in its own folder, trained with the cell's overrides on top of base and its seed
    cfg = json.loads((out / "runs" / f"{rows[3]['cell']}-seed1" / "config.json").read_text())["train"]
    assert (cfg["lookahead"], cfg["local_frame_range"], cfg["seed"], cfg["num_heads"], cfg["lr"]) == (0, 2, 1, 2, 3e-3)
    # seeds differ, so runs of one cell are not copies
    loss = [
        json.loads((out / "runs" / f"{rows[0]['cell']}-seed{s}" / "metrics.json").read_text())["epochs"][0]["train_loss"]
        for s in (0, 1)
    ]
    assert loss[0] != loss[1]
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["runs"]) == 10 and summary["grid"]["axes"] == {"lookahead": [0, 1], "local_frame_range": [1, 2]}
    cells = summary["cells"]
    assert len(cells) == 5 and sum(c["best"] for c in cells) == 1
    best = next(c for c in cells if c["best"])
    assert best["kind"] == "grid" and best["top1_mean"] == max(c["top1_mean"] for c in cells if c["kind"] == "grid")
    md = (out / "summary.md").read_text()
    assert "★" in md and "mean-linear" in md and "±" in md
    assert {p.name for p in (out / "plots").iterdir()} == {
        "top1_vs_lookahead.png", "top1_vs_range.png", "top1_vs_params.png", "top1_vs_throughput.png",
        "top1_vs_flops.png", "top1_vs_eval_throughput.png",
    }  # fmt: skip


def test_rerun_skips_complete_runs(reference):
    before = read_csv(reference.out / "results.csv")
    again = run_ablation(reference.grid, progress=False)
    assert (again.trained, again.skipped) == (0, 10)
    assert read_csv(reference.out / "results.csv") == before


@pytest.mark.slow
def test_killed_ablation_resumes_to_the_same_results(store, reference, tmp_path):
    grid_file = write_grid(tmp_path / "grid.yaml", store, tmp_path / "out")
    code = "import sys; from spool.ablate import load_grid, run_ablation; run_ablation(load_grid(sys.argv[1]), progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(grid_file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = tmp_path / "out" / "runs"
    deadline = time.monotonic() + 120
    while len(list(runs.glob("*/result.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.5))  # lands mid-run, between runs or while writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = len(list(runs.glob("*/result.json")))
    assert 2 <= done < 10, "the kill should land after some runs and before the end"
    assert not (tmp_path / "out" / "results.csv").exists()

    resumed = run_ablation(load_grid(grid_file), progress=False)
    assert resumed.skipped == done and resumed.trained == 10 - done
    assert read_csv(tmp_path / "out" / "results.csv") == read_csv(reference.out / "results.csv")


def test_failing_run_is_recorded_and_the_others_go_on(store, tmp_path, monkeypatch):
    real = spool.train.train_head

    def flaky(cfg, **kw):
        if cfg.lookahead == 1 and cfg.seed == 0:
            raise spool.train.NonFiniteLossError("loss became nan at epoch 1, step 1")
        return real(cfg, **kw)

    monkeypatch.setattr(spool.train, "train_head", flaky)
    changes = {"grid": {"lookahead": [0, 1]}, "baselines": [], "base": {**BASE, "epochs": 1}}
    grid = load_grid(write_grid(tmp_path / "grid.yaml", store, tmp_path / "out", **changes))
    result = run_ablation(grid, progress=False)
    assert (result.trained, result.failed) == (3, 1)
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    assert "NonFiniteLossError: loss became nan" in rows[2]["error"] and rows[2]["top1"] == ""
    assert "1 failed" in (tmp_path / "out" / "summary.md").read_text()

    monkeypatch.setattr(spool.train, "train_head", real)
    kept = run_ablation(grid, progress=False)  # as extract keeps failed videos: failed until asked
    assert (kept.trained, kept.skipped, kept.failed, kept.kept_failed) == (0, 3, 0, 1)
    assert [r["status"] for r in read_csv(tmp_path / "out" / "results.csv")] == ["ok", "ok", "failed", "ok"]
    assert "--retry-failed" in (tmp_path / "out" / "summary.md").read_text()

    retried = run_ablation(grid, progress=False, retry_failed=True)  # only the failed run trains again
    assert (retried.trained, retried.skipped, retried.failed, retried.retried) == (1, 3, 0, 1)
    assert [r["status"] for r in read_csv(tmp_path / "out" / "results.csv")] == ["ok"] * 4


def test_retry_failed_reaches_run_ablation_and_the_summary_says_what_was_kept(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import spool.ablate
    from spool.ablate import AblationResult
    from spool.cli.app import app

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"store": "s.zarr", "out": str(tmp_path / "out"), "grid": {"range": [1]}}))
    seen = {}

    def fake(grid, **kw):
        seen.update(kw)
        return AblationResult(grid=grid, cells=[], runs=[], kept_failed=0 if kw["retry_failed"] else 2)

    monkeypatch.setattr(spool.ablate, "run_ablation", fake)
    kept = CliRunner().invoke(app, ["ablate", str(grid_file), "-q"])
    assert seen["retry_failed"] is False and kept.exit_code == 1
    assert "2 runs failed" in kept.output and "--retry-failed trains them again" in " ".join(kept.output.split())
    retried = CliRunner().invoke(app, ["ablate", str(grid_file), "-q", "--retry-failed"])
    assert seen["retry_failed"] is True and retried.exit_code == 0, retried.output


def test_a_second_ablation_on_the_same_out_is_refused_naming_the_first(store, tmp_path):
    out = tmp_path / "out"
    grid = load_grid(write_grid(tmp_path / "grid.yaml", store, out, grid={"range": [1]}, seeds=[0], baselines=[]))
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from spool.ablate import lock_out; "
         "lock_out(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GridError, match=rf"in use by another `spool ablate`, PID {holder.pid} .*lock file"):
            run_ablation(grid, progress=False)
        assert not (out / "runs").exists()  # the second trained nothing
    finally:
        holder.kill()
        holder.wait()
    again = run_ablation(grid, progress=False)  # the kernel dropped the dead holder's lock
    assert again.trained == 1


@pytest.mark.slow
def test_parallel_jobs_and_token_pool_groups_match_one_process(store, tmp_path):
    changes = {"grid": {"token-pool": [1, 2], "range": [1]}, "seeds": [0], "baselines": ["attentive-probe"]}
    one = run_ablation(load_grid(write_grid(tmp_path / "a.yaml", store, tmp_path / "a", **changes)), progress=False)
    two = run_ablation(load_grid(write_grid(tmp_path / "b.yaml", store, tmp_path / "b", **changes)), jobs=2, progress=False)
    assert (one.trained, two.trained) == (3, 3)
    rows = read_csv(tmp_path / "a" / "results.csv")
    assert rows == read_csv(tmp_path / "b" / "results.csv")
    pooled = json.loads((tmp_path / "a" / "runs" / f"{rows[1]['cell']}-seed0" / "config.json").read_text())
    assert pooled["features"]["token_pool"] == 2 and pooled["features"]["num_tokens"] == 1


# --- the grid file ----------------------------------------------------------------------


def grid_error(tmp_path, store, match, **changes):
    path = write_grid(tmp_path / "bad.yaml", store, tmp_path / "out", **changes)
    with pytest.raises(GridError, match=match) as info:
        run_ablation(load_grid(path), progress=False)
    assert not (tmp_path / "out").exists(), "nothing may run or be written for a bad grid"
    assert "bad.yaml" in str(info.value)
    return str(info.value)


def test_unknown_key_names_its_path_and_the_allowed_keys(store, tmp_path):
    msg = grid_error(tmp_path, store, r"base: unknown key 'hedas' \(did you mean 'heads'\?\)", base={**BASE, "hedas": 4})
    assert "allowed: backend, batch-size" in msg
    grid_error(tmp_path, store, r"grid: unknown key 'lookahaed'", grid={"lookahaed": [0, 1]})
    grid_error(tmp_path, store, r"unknown top-level key 'epochs'.*put it under base or grid", epochs=3)
    grid_error(tmp_path, store, r"exclude\[0\]\.depth: depth is not a grid axis", exclude=[{"depth": 2}])


def test_wrong_type_or_value_names_the_path_and_what_is_allowed(store, tmp_path):
    grid_error(tmp_path, store, r"grid\.range\[1\]: 'two' is not allowed; expected an integer >= 0", grid={"range": [1, "two"]})
    grid_error(tmp_path, store, r"base\.lr: 0 is not allowed; expected a number > 0", base={**BASE, "lr": 0})
    grid_error(tmp_path, store, r"grid\.backend\[0\]: 'fast' .* expected auto \| flex \| blocked \| dense", grid={"backend": ["fast"]})
    grid_error(tmp_path, store, r"grid\.depth\[0\]: True is not allowed", grid={"depth": [True]})
    grid_error(tmp_path, store, r"grid\.val-fraction: .*set it in base", grid={"val-fraction": [0.2, 0.3]})
    grid_error(tmp_path, store, r"grid\.val-from-train: .*set it in base", grid={"val-from-train": [0.1, 0.2]})
    grid_error(tmp_path, store, r"seeds: expected a non-empty list of integers", seeds=["a"])


def test_impossible_combination_is_caught_with_the_store_shapes(store, tmp_path):
    # lookahead 3 > heads 2, only in one cell of the product
    grid_error(tmp_path, store, r"grid cell lookahead=3, range=1 with base heads=2.*--lookahead 3 leaves 3 lookahead heads", grid={"lookahead": [0, 3], "range": [1]})
    # dim 8 is not divisible by 3 heads
    no_heads = {k: v for k, v in BASE.items() if k != "heads"}
    grid_error(tmp_path, store, r"grid cell heads=3 with base .*--dim 8 is not divisible by --heads 3", grid={"heads": [2, 3]}, base=no_heads)
    # token_pool 3 does not tile the store's 2 x 2 patch grid
    grid_error(tmp_path, store, r"configs\[0\].*--token-pool 3", configs=[{"token-pool": 3}])
    # a store too small to draw a val split of val-fraction 0.2 (5 folds) from
    small = tmp_path / "small.zarr"
    make_store(small, num_videos=3, num_classes=2, T=4, L=4, D=8).close()
    grid_error(tmp_path, str(small), r"small.zarr: cannot split the store for training")


def test_unknown_baseline(store, tmp_path):
    grid_error(tmp_path, store, r"baselines\[1\]: unknown baseline 'linear'; allowed: mean-linear, attentive-probe", baselines=["mean-linear", "linear"])


def test_keys_accept_cli_and_field_spellings():
    a = parse_grid({"store": "s", "out": "o", "base": {"batch-size": 4, "no-context": True}, "grid": {"range": [1]}})
    b = parse_grid({"store": "s", "out": "o", "base": {"batch_size": 4, "context": False}, "grid": {"local_frame_range": [1]}})
    c = parse_grid({"store": "s", "out": "o", "base": {"batch_size": 4, "context_frames": False}, "grid": {"range": [1]}})
    assert a == b == c
    assert a.base == {"batch_size": 4, "context_frames": False} and a.axes == (("local_frame_range", (1,)),)
    assert parse_grid({"store": "s", "out": "o", "base": {"lr": "1e-3"}, "grid": {"depth": [1]}}).base["lr"] == 1e-3
    over = parse_grid({"out": "o", "grid": {"depth": [1]}}, store_override="t.zarr", out_override="p")
    assert (over.store, over.out) == ("t.zarr", "p")
    over = parse_grid({"out": "o", "store": "s", "cache": "none", "grid": {"depth": [1]}}, cache_override="memory")
    assert over.cache == "memory"
    with pytest.raises(GridError, match=r"cache: 'disk' is not allowed; expected auto \| none \| memory \| gpu"):
        parse_grid({"out": "o", "store": "s", "grid": {"depth": [1]}}, cache_override="disk")
    with pytest.raises(GridError, match="store: missing"):
        parse_grid({"out": "o", "grid": {"depth": [1]}})


def test_expansion_order_exclusions_configs_and_ids():
    g = parse_grid({
        "store": "s", "out": "o", "base": {"heads": 4},
        "grid": {"lookahead": [0, 2], "depth": [1, 2, 3]},
        "exclude": [{"lookahead": 2, "depth": [2, 3]}],
        "configs": [{"lookahead": 1, "dim": 16}],
        "baselines": ["attentive-probe"],
    })  # fmt: skip
    cells = expand(g, "fp")
    assert [c.overrides for c in cells] == [
        {"lookahead": 0, "depth": 1}, {"lookahead": 0, "depth": 2}, {"lookahead": 0, "depth": 3},
        {"lookahead": 2, "depth": 1}, {"lookahead": 1, "dim": 16}, {},
    ]  # fmt: skip
    assert [c.kind for c in cells] == ["grid"] * 4 + ["config", "baseline"]
    assert cells[0].id.startswith("lookahead0-depth1-") and cells[-1].id.startswith("attentive-probe-")
    # the id hashes what the run computes: another base or store gives other run folders
    assert expand(g, "fp")[0].id == cells[0].id
    assert expand(g, "other")[0].id != cells[0].id
    g2 = parse_grid({"store": "s", "out": "o", "base": {"heads": 4, "epochs": 3}, "grid": {"lookahead": [0], "depth": [1]}})
    assert expand(g2, "fp")[0].id != cells[0].id
    dup = parse_grid({"store": "s", "out": "o", "grid": {"depth": [1, 2]}, "configs": [{"depth": 2}]})
    with pytest.raises(GridError, match=r"configs\[0\] trains the same configuration as grid cell depth=2"):
        expand(dup)


def test_dry_run_lists_cells_and_trains_nothing(store, tmp_path, capsys):
    from rich.console import Console

    grid = load_grid(write_grid(tmp_path / "grid.yaml", store, tmp_path / "out"))
    plan = run_ablation(grid, dry_run=True, progress=False)
    assert (len(plan.cells), len(plan.runs), plan.trained) == (5, 10, 0)
    assert not (tmp_path / "out").exists()
    print_plan(plan, Console(width=200))
    text = capsys.readouterr().out
    assert "5 cells x 2 seeds = 10 runs" in text and "lookahead=1, range=2" in text and "mean-linear" in text


def test_example_grid_is_valid():
    grid = load_grid(Path(__file__).parent.parent / "examples" / "grid.yaml", store_override="x.zarr")
    assert len(expand(grid)) > 1


def _no_overlap(fig) -> None:
    """The legend sits beside the axes and no text on the axes overlaps another text."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer)), "the legend covers the plot"
    texts = [t.get_window_extent(renderer) for t in ax.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(texts) for b in texts[i + 1 :])


def test_plots_have_seed_error_bars_baseline_and_chance_lines(reference):
    import numpy as np
    from matplotlib.container import ErrorbarContainer

    from spool.ablate import LOG_SPAN, axis_figure, scatter_figure

    chance = 0.5
    fig = axis_figure(reference, "lookahead", chance)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # one line per range value
    # the error bar of (lookahead=0, range=1) is the std over seeds of that cell's top-1
    rows = [r for r in reference.rows if r["kind"] == "grid" and r["lookahead"] == 0 and r["range"] == 1]
    lo, hi = bars[0].lines[2][0].get_segments()[0][:, 1]
    assert hi - lo == pytest.approx(2 * 100 * np.std([r["top1"] for r in rows]))
    labels = [line.get_label() for line in ax.get_lines()]
    assert "mean-linear (baseline)" in labels and "chance (50.0%)" in labels
    base = next(s for s in reference.summary if s["kind"] == "baseline")
    hline = next(line for line in ax.get_lines() if line.get_label() == "mean-linear (baseline)")
    assert hline.get_ydata()[0] == pytest.approx(100 * base["top1_mean"])
    _no_overlap(fig)

    fig = scatter_figure(reference, "clips_per_s", "train clips/s", chance)
    ax = fig.axes[0]
    assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == len(reference.summary)
    assert not ax.texts  # cells are named in the legend, not next to their points
    rates = [s["clips_per_s"] for s in reference.summary]
    assert ax.get_xscale() == ("log" if max(rates) / min(rates) > LOG_SPAN else "linear")
    _no_overlap(fig)


def test_throughput_spanning_orders_of_magnitude_is_drawn_on_a_log_axis(reference):
    import dataclasses

    from spool.ablate import scatter_figure

    summary = [dict(s) for s in reference.summary]
    for s in summary:  # a baseline a thousand times faster than the heads
        s["clips_per_s"] = 1e6 if s["kind"] == "baseline" else 1e3 + len(s["cell"])
    fast = dataclasses.replace(reference, summary=summary)
    assert scatter_figure(fast, "clips_per_s", "train clips/s").axes[0].get_xscale() == "log"
    for s in summary:
        s["clips_per_s"] = 1000.0 + len(s["cell"])
    assert scatter_figure(fast, "clips_per_s", "train clips/s").axes[0].get_xscale() == "linear"


def test_val_from_train_in_base_reaches_every_run_and_keeps_other_grids_folders(store, tmp_path):
    from spool.ablate import plan_ablation

    plain = load_grid(write_grid(tmp_path / "a.yaml", store, tmp_path / "a"))
    held = load_grid(write_grid(tmp_path / "b.yaml", store, tmp_path / "b", base={**BASE, "val-from-train": 0.25}))
    _, plain_runs = plan_ablation(plain)
    _, held_runs = plan_ablation(held)
    assert all(r.cfg.val_from_train == 0.25 for r in held_runs)
    assert all(r.cfg.val_from_train == 0.0 for r in plain_runs)
    # a different selection of the best epoch is a different run, in its own folder
    assert {r.cell.id for r in plain_runs}.isdisjoint({r.cell.id for r in held_runs})


def test_the_results_table_off_a_terminal_keeps_every_column_whole(reference, capsys):
    """A Slurm or nohup log is not a terminal: rich would cut the table to 80 columns there
    (cell ids and numbers ending in '…'); spool.progress.make_console gives it room instead."""
    from spool.ablate import _summary_rows, print_summary

    print_summary(reference)  # to stdout, which pytest captures: not a terminal
    printed = capsys.readouterr().out
    header, body = _summary_rows(reference)
    assert len(" | ".join(header)) > 80 or any(len(" | ".join(r)) > 80 for r in body)  # wider than 80 columns
    assert "…" not in printed
    for row in body:
        for value in row:
            assert value in printed, (value, printed)
