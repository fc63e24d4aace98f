"""The paper's comparisons in one grid: heads as a grid key, the store (backbone) axis,
--set, range 'all', the efficiency columns, and examples/seed-ablations.yaml."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_data import make_store
from typer.testing import CliRunner

import spool.ablate
from spool.ablate import load_grid, run_ablation
from spool.grid import GridError, expand, parse_grid
from spool.stores import create_store

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seed-ablations.yaml"
BASE = {"heads": 2, "dim": 8, "depth": 1, "epochs": 1, "batch-size": 8, "lr": "3e-3"}


def grid(**data):
    return parse_grid({"store": "s.zarr", "out": "o", "base": BASE, **data})


def backbone_store(path, backbone, *, D=8, L=4, labels=None, ids=None, seed=0):
    """A store of 10 videos (v % 2 is the class) as `backbone` would give them: its own width
    and token count, the same video ids, labels and (drawn) split as any other made here."""
    num_videos = 10
    labels = np.arange(num_videos) % 2 if labels is None else np.asarray(labels)
    rng = np.random.default_rng(seed)
    store = create_store(path, video_ids=ids or [f"v{i:03d}.mp4" for i in range(num_videos)], labels=labels,
                         splits=np.full(num_videos, -1), class_names=["a", "b"], clips_per_video=2, num_frames=4,
                         num_tokens=L, dim=D, attrs={"backbone": backbone})  # fmt: skip
    directions = rng.standard_normal((2, D))
    for v in range(num_videos):
        patches = rng.standard_normal((2, 4, L, D)) + 2.0 * directions[labels[v]]
        store.write_video(v, patches.astype(np.float16), patches.mean(2).astype(np.float16),
                          np.tile(np.arange(4), (2, 1)), num_frames=4, fps=25.0)  # fmt: skip
    store.close()
    return str(path)


# --- heads as a grid key --------------------------------------------------------------------


def test_a_head_axis_trains_a_reference_head_once_whatever_the_range():
    g = grid(grid={"head": ["spool", "full", "factorized"], "range": [1, 2]})
    cells = expand(g, "fp")
    assert [(c.head, c.overrides) for c in cells] == [
        ("spool", {"head": "spool", "local_frame_range": 1}), ("spool", {"head": "spool", "local_frame_range": 2}),
        ("full", {"head": "full"}), ("factorized", {"head": "factorized"}),
    ]  # fmt: skip
    assert cells[2].id.startswith("full-") and cells[0].id.startswith("range1-")
    # a config that repeats a grid cell is still an error
    with pytest.raises(GridError, match=r"configs\[0\] trains the same configuration as grid cell head=full"):
        expand(grid(grid={"head": ["full"], "range": [1]}, configs=[{"head": "full", "range": 3}]), "fp")


def test_spool_cell_ids_do_not_change():
    # run folders of grids written before the head key keep their names (resuming them)
    assert expand(grid(grid={"lookahead": [0]}), "fp")[0].id == expand(
        grid(grid={"lookahead": [0]}, configs=[{"head": "full"}]), "fp"
    )[0].id


def test_range_takes_all_and_says_so():
    assert grid(grid={"range": [1, "all"]}).axes == (("local_frame_range", (1, "all")),)
    with pytest.raises(GridError, match=r"grid.range\[0\]: 'most' is not allowed; expected an integer >= 0 \| all"):
        grid(grid={"range": ["most"]})


def test_head_in_base_applies_to_the_cells_not_the_baselines():
    g = parse_grid({"store": "s", "out": "o", "base": {**BASE, "head": "full"}, "grid": {"dropout": [0.0, 0.1]},
                    "baselines": ["mean-linear"]})  # fmt: skip
    assert [c.head for c in expand(g, "fp")] == ["full", "full", "mean-linear"]


# --- --set ------------------------------------------------------------------------------------


def test_set_replaces_base_keys_and_refuses_axes(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"store": "s", "out": "o", "base": BASE, "grid": {"range": [1, 2]}}))
    assert load_grid(path, base_override={"epochs": 7, "batch_size": 4}).base["epochs"] == 7
    with pytest.raises(GridError, match="grid.range: range is also set by --set"):
        load_grid(path, base_override={"range": 3})
    with pytest.raises(GridError, match="--set: unknown key 'epoch'"):
        load_grid(path, base_override={"epoch": 3})


def test_docs_list_every_grid_key_with_its_field():
    from spool.grid import KEYS

    table = (Path(__file__).resolve().parents[1] / "docs" / "ablate.md").read_text()
    missing = [k for k, option in KEYS.items() if f"| `{k}` | `{option.field}`" not in table]
    assert missing == []


def test_seeds_override_replaces_the_files_seeds_and_is_checked_like_them(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"store": "s", "out": "o", "base": BASE, "grid": {"range": [1, 2]}, "seeds": [0, 1, 2]}))
    assert load_grid(path).seeds == (0, 1, 2)
    assert load_grid(path, seeds_override=[5]).seeds == (5,)
    with pytest.raises(GridError, match="seeds: repeated seeds"):
        load_grid(path, seeds_override=[1, 1])


# --- the store axis -----------------------------------------------------------------------


def test_store_is_a_path_or_an_axis_never_both():
    with pytest.raises(GridError, match="the top-level store has no place"):
        grid(grid={"store": ["a.zarr", "b.zarr"]})
    g = parse_grid({"out": "o", "base": BASE, "grid": {"store": ["a.zarr", "b.zarr"]}})
    assert g.stores == ("a.zarr", "b.zarr") and g.store == "a.zarr"
    with pytest.raises(GridError, match="--store has no place"):
        parse_grid({"out": "o", "grid": {"store": ["a.zarr"]}}, store_override="c.zarr")
    with pytest.raises(GridError, match=r"base.store: store is set at the top level, or as a grid axis"):
        parse_grid({"store": "a.zarr", "out": "o", "base": {"store": "b.zarr"}, "grid": {"depth": [1]}})


def test_store_axis_end_to_end(tmp_path, monkeypatch):
    a = backbone_store(tmp_path / "dino.zarr", "dinov2_vits14", D=8, L=4)
    b = backbone_store(tmp_path / "clip.zarr", "clip_b16", D=12, L=9, seed=1)
    loads = []
    load = spool.ablate.load_group_features
    monkeypatch.setattr(spool.ablate, "load_group_features",
                        lambda g, store, *a, **k: loads.append(store) or load(g, store, *a, **k))  # fmt: skip
    g = parse_grid({"out": str(tmp_path / "out"), "base": {**BASE, "heads": 4, "dim": None}, "workers": 0,
                    "grid": {"store": [a, b]}, "configs": [{"head": "full"}], "baselines": ["mean-linear"]})  # fmt: skip
    result = run_ablation(g, progress=False)
    assert result.failed == 0 and result.trained == 6
    assert sorted(loads) == sorted([a, b])  # each store's features loaded once, shared by its cells
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["head"], r["backbone"]) for r in rows] == [
        ("spool", "dinov2_vits14"), ("spool", "clip_b16"), ("full", "dinov2_vits14"), ("full", "clip_b16"),
        ("mean-linear", "dinov2_vits14"), ("mean-linear", "clip_b16"),
    ]  # fmt: skip
    assert [r["store"] for r in rows] == [a, b] * 3
    assert all(r["fingerprint"] and int(r["flops"]) > 0 and float(r["eval_videos_per_s"]) > 0 for r in rows)
    assert float(rows[3]["flops"]) > float(rows[2]["flops"])  # the wider store's full head costs more
    record = json.loads((Path(result.runs[1].dir) / "result.json").read_text())
    assert record["store"]["backbone"] == "clip_b16" and record["store"]["path"] == b
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "backbone dinov2_vits14" in md and "clip_b16" in md and "GFLOPs/clip" in md
    assert {p.name for p in (tmp_path / "out" / "plots").iterdir()} >= {
        "top1_vs_store.png", "top1_vs_flops.png", "top1_vs_throughput.png", "top1_vs_eval_throughput.png"
    }  # fmt: skip


@pytest.mark.parametrize("change, message", [
    (dict(labels=[0, 1, 0, 0, 0, 1, 0, 1, 0, 1]), r"video 3 \(v003.mp4\) differs in its label: 1 in .*dino.zarr, 0 in"),
    (dict(ids=[f"v{i:03d}.mp4" for i in range(9)] + ["other.mp4"]), r"video 9 \(v009.mp4\) differs in its video id"),
])  # fmt: skip
def test_stores_of_an_axis_must_hold_the_same_videos(tmp_path, change, message):
    a = backbone_store(tmp_path / "dino.zarr", "dinov2_vits14")
    b = backbone_store(tmp_path / "clip.zarr", "clip_b16", **change)
    g = parse_grid({"out": str(tmp_path / "out"), "base": BASE, "grid": {"store": [a, b]}})
    with pytest.raises(GridError, match="do not hold the same videos: " + message):
        run_ablation(g, dry_run=True, progress=False)


# --- the paper's ablation file ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("seed") / "feats.zarr"
    make_store(path, num_videos=12, num_classes=3, T=4, L=4, D=8, signal=2.0, order_signal=1.0).close()
    return str(path)


def test_seed_ablations_validates_with_store_out_and_epochs_from_the_command_line(tiny_store, tmp_path):
    from cli.app import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ablate", str(EXAMPLE), "--store", tiny_store, "--out", str(out),
                                      "--set", "epochs=1", "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "16 cells x 3 seeds" in result.output
    one_seed = CliRunner().invoke(app, ["ablate", str(EXAMPLE), "--store", tiny_store, "--out", str(out),
                                        "--seeds", "4", "--dry-run"])  # fmt: skip
    assert one_seed.exit_code == 0 and "16 cells x 1 seeds" in one_seed.output, one_seed.output and "epochs=1" in result.output and not out.exists()
    g = load_grid(EXAMPLE, store_override=tiny_store, out_override=str(out))
    heads = [c.head for c in expand(g, "fp")]
    assert heads.count("spool") == 12 and {"full", "factorized", "mean-linear", "attentive-probe"} <= set(heads)


@pytest.mark.slow
def test_seed_ablations_runs_end_to_end(tiny_store, tmp_path):
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(store=tiny_store, out=str(tmp_path / "out"), seeds=[0], workers=0, device="cpu")
    data["base"]["epochs"] = 1
    result = run_ablation(parse_grid(data), progress=False)
    assert result.failed == 0 and result.trained == 16
    md = (tmp_path / "out" / "summary.md").read_text()
    assert all(h in md for h in ("| full |", "| factorized |", "| mean-linear |", "| attentive-probe |"))
