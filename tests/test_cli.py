"""The commands are thin: options reach the library call, errors become exit codes with a message."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spool.cli.app import app
from spool.stores import create_store
from spool.train import TrainConfig

runner = CliRunner()


def test_train_head_options_reach_train_config(monkeypatch, tmp_path):
    seen = {}

    class Result:
        def result_line(self):
            return "the result line"

    def fake_train_head(cfg, *, progress, dist):
        seen["cfg"], seen["progress"], seen["dist"] = cfg, progress, dist
        return Result()

    monkeypatch.setattr("spool.train.train_head", fake_train_head)
    args = ["train-head", str(tmp_path / "feats.zarr"), "--lookahead", "4", "--heads", "8", "--range", "3",
            "--depth", "2", "--dim", "128", "--no-context", "--token-pool", "2", "--epochs", "7", "--batch-size", "16",
            "--lr", "0.001", "--weight-decay", "0.1", "--label-smoothing", "0.1", "--dropout", "0.2", "--seed", "5",
            "--backend", "dense", "--device", "cpu", "--resume", "--cache", "memory", "--val-from-train", "0.1",
            "--overwrite", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.lookahead, cfg.num_heads, cfg.local_frame_range, cfg.depth, cfg.dim) == (4, 8, 3, 2, 128)
    assert (cfg.context_frames, cfg.token_pool, cfg.epochs, cfg.batch_size) == (False, 2, 7, 16)
    assert (cfg.lr, cfg.weight_decay, cfg.label_smoothing, cfg.dropout, cfg.seed) == (0.001, 0.1, 0.1, 0.2, 5)
    assert (cfg.backend, cfg.device, cfg.resume, cfg.cache, cfg.head) == ("dense", "cpu", True, "memory", "spool")
    assert (cfg.val_from_train, cfg.overwrite) == (0.1, True)
    assert cfg.out == str(Path("runs") / "feats-spool")
    assert result.output.strip() == "the result line"  # printed under -q too
    assert seen["progress"] is False and seen["dist"] is None  # not under torchrun


def test_motion_options_reach_train_config_and_bad_values_are_refused(monkeypatch, tmp_path):
    seen = {}

    class Result:
        def result_line(self):
            return "ok"

    monkeypatch.setattr("spool.train.train_head", lambda cfg, **kw: seen.setdefault("cfg", cfg) and Result())
    store = str(tmp_path / "feats.zarr")
    result = runner.invoke(app, ["train-head", store, "--no-spatial-embedding", "--correlation", "none",
                                 "--spatial-range", "1", "--no-correlation-token-norm", "--no-correlation-moments",
                                 "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = seen.pop("cfg")
    motion = ("spatial_embedding", "correlation_range", "spatial_range", "correlation_token_norm", "correlation_moments")
    assert tuple(getattr(cfg, k) for k in motion) == (False, None, 1, False, False)
    assert runner.invoke(app, ["train-head", store, "-q"]).exit_code == 0
    cfg = seen.pop("cfg")  # the command's defaults are TrainConfig's: what reads motion in real features
    defaults = TrainConfig(store="s", out="o")
    assert tuple(getattr(cfg, k) for k in motion) == tuple(getattr(defaults, k) for k in motion)
    assert (cfg.spatial_embedding, cfg.correlation_token_norm, cfg.correlation_moments) == (True, True, True)
    for option, value in (("--correlation", "-1"), ("--spatial-range", "wide")):
        bad = runner.invoke(app, ["train-head", store, option, value])
        assert bad.exit_code == 2 and option in bad.output and "cfg" not in seen


@pytest.mark.parametrize("head", ["full", "factorized"])
def test_train_head_takes_the_reference_heads_and_range_all(monkeypatch, tmp_path, head):
    seen = {}

    class Result:
        def result_line(self):
            return "ok"

    def fake_train_head(cfg, *, progress, dist):
        seen["cfg"] = cfg
        return Result()

    monkeypatch.setattr("spool.train.train_head", fake_train_head)
    result = runner.invoke(app, ["train-head", str(tmp_path / "f.zarr"), "--head", head, "--range", "all", "-q"])
    assert result.exit_code == 0, result.output
    assert (seen["cfg"].head, seen["cfg"].local_frame_range) == (head, "all")
    bad = runner.invoke(app, ["train-head", str(tmp_path / "f.zarr"), "--range", "most", "-q"])
    assert bad.exit_code == 2 and "'all'" in bad.output


def test_train_head_on_a_missing_store_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["train-head", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2
    assert "nope.zarr" in result.output


def test_show_mask_json_is_the_frame_rule():
    result = runner.invoke(app, ["show-mask", "--frames", "4", "--range", "1", "--heads", "2", "--lookahead", "1", "--json"])
    assert result.exit_code == 0, result.output
    masks = json.loads(result.output)
    # rows: query frames C_s, 1..4, C_e; a lookback head in frame 3 sees C_s, 2 and 3
    assert masks["lookback"][3] == [1, 0, 1, 1, 0, 0]
    assert masks["lookahead"][3] == [0, 0, 0, 1, 1, 1]
    assert masks["lookback"][0] == [1] * 6 and masks["lookahead"][5] == [1] * 6
    drawn = runner.invoke(app, ["show-mask", "--frames", "4", "--range", "1"])
    assert "lookback (3 heads)" in drawn.output and "C_e" in drawn.output
    bad = runner.invoke(app, ["show-mask", "--heads", "2", "--lookahead", "3"])
    assert bad.exit_code == 2 and "--lookahead 3 must be between 0 and --heads 2" in bad.output


@pytest.mark.parametrize("args, message", [
    (["--range", "-1"], "--range must be >= 0, got -1"),
    (["--frames", "0"], "--frames must be >= 1, got 0"),
    (["--heads", "0"], "--heads must be >= 1, got 0"),
])  # fmt: skip
def test_show_mask_refuses_what_train_head_refuses(args, message):
    for json_flag in ([], ["--json"]):
        bad = runner.invoke(app, ["show-mask", *args, *json_flag])
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert "#" not in bad.output  # no mask drawn


def test_info_json_counts_done_and_failed_videos(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(path, video_ids=["a/1.mp4", "b/1.mp4", "b/2.mp4"], labels=[0, 1, 1], splits=[0, 0, 1],
                      class_names=["a", "b"], clips_per_video=1, num_frames=2, num_tokens=4, dim=8,
                      attrs={"backbone": "dinov2_vits14"}) as store:
        store.write_video(0, np.ones((1, 2, 4, 8), np.float16), np.ones((1, 2, 8), np.float16),
                          np.array([[0, 1]]), 2, 25.0)
        store.mark_failed(2, "zero frames")
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["status"] == {"pending": 1, "done": 1, "failed": 1}
    assert info["done_videos_per_class"] == {"a": 1, "b": 0}
    assert info["failures"] == [{"video_id": "b/2.mp4", "reason": "zero frames"}]
    text = runner.invoke(app, ["info", str(path)])
    assert text.exit_code == 0 and "zero frames" in text.output
    missing = runner.invoke(app, ["info", str(tmp_path / "none.zarr")])
    assert missing.exit_code == 2 and "no store" in missing.output


def test_ablate_dry_run_lists_cells_and_a_bad_grid_runs_nothing(monkeypatch, tmp_path):
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    n = 8
    with create_store(path, video_ids=[f"v{i}.mp4" for i in range(n)], labels=[i % 2 for i in range(n)],
                      splits=[0] * 6 + [1] * 2, class_names=["a", "b"], clips_per_video=1, num_frames=2,
                      num_tokens=4, dim=8, attrs={}) as store:
        for v in range(n):
            store.write_video(v, rng.standard_normal((1, 2, 4, 8)).astype(np.float16),
                              rng.standard_normal((1, 2, 8)).astype(np.float16), np.array([[0, 1]]), 2, 25.0)
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {epochs: 1, heads: 2}\ngrid:\n  lookahead: [0, 1, 2]\n  range: [1, 2]\nseeds: [0, 1]\n")
    out = tmp_path / "abl"
    result = runner.invoke(app, ["ablate", str(grid), "--store", str(path), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "6 cells x 2 seeds = 12 runs" in " ".join(result.output.split())
    assert not (out / "results.csv").exists()

    # off a terminal (a Slurm log), long cell ids and overrides are printed whole, not cut to 80 columns
    grid.write_text("base: {epochs: 1, heads: 2}\ngrid:\n  lookahead: [0, 1]\n  range: [1, 2]\n  depth: [1]\n"
                    "  weight-decay: [0.05]\n  label-smoothing: [0.1]\n  dropout: [0.0]\n")
    wide = runner.invoke(app, ["ablate", str(grid), "--store", str(path), "--out", str(out), "--dry-run"])
    assert wide.exit_code == 0, wide.output
    from spool.ablate import plan_ablation
    from spool.grid import load_grid

    cells, _ = plan_ablation(load_grid(grid, store_override=path, out_override=out))
    assert len(cells) == 4 and all(len(c.id) > 40 for c in cells)
    for c in cells:
        assert c.id in wide.output, wide.output
    assert "…" not in wide.output

    grid.write_text("base: {epochs: 1, heads: 2}\ngrid:\n  lookahead: [0, 3]\n")
    bad = runner.invoke(app, ["ablate", str(grid), "--store", str(path), "--out", str(out)])
    assert bad.exit_code == 2
    assert "lookahead" in bad.output
    assert not (out / "results.csv").exists()


def test_verify_names_a_missing_chunk_and_exits_1(tmp_path):
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    with create_store(path, video_ids=["a.mp4", "b.mp4"], labels=[0, 1], splits=[0, 1], class_names=["a", "b"],
                      clips_per_video=1, num_frames=2, num_tokens=4, dim=8, attrs={}) as store:
        for v in range(2):
            store.write_video(v, rng.standard_normal((1, 2, 4, 8)).astype(np.float16),
                              rng.standard_normal((1, 2, 8)).astype(np.float16), np.array([[0, 1]]), 2, 25.0)
    ok = runner.invoke(app, ["verify", str(path)])
    assert ok.exit_code == 0, ok.output
    (path / "patches" / "c" / "1" / "0" / "0" / "0").unlink()
    bad = runner.invoke(app, ["verify", str(path), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert any("patches/c/1/0/0/0" in p["where"] for p in report["problems"])
    assert any(p["video_id"] == "b.mp4" for p in report["problems"])


def test_a_path_that_is_not_a_store_says_how_to_make_one(tmp_path):
    (tmp_path / "empty.zarr").mkdir()  # e.g. a folder made by hand, or by a copy that failed
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    for name in ("missing.zarr", "empty.zarr", "junk.h5"):
        for command in (["info"], ["train-head", "-q", "--out", str(tmp_path / "run")]):
            result = runner.invoke(app, [command[0], str(tmp_path / name), *command[1:]])
            text = " ".join(result.output.split())
            assert result.exit_code == 2, text
            assert f"`spool extract SRC --out {tmp_path / name}`" in text and "create_store" not in text, text
    assert not (tmp_path / "run").exists()


def test_paths_with_brackets_are_printed_whole(tmp_path):
    # rich reads "[b]" or "[exp1]" as markup and drops it: an error naming the user's path lost part of it
    folder = tmp_path / "[exp1]" / "[b]"
    result = runner.invoke(app, ["info", str(folder / "feats.zarr")])
    assert result.exit_code == 2
    assert f"no store at {folder / 'feats.zarr'}" in " ".join(result.output.split()), result.output
