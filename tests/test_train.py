from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_data import make_store

from spool.checkpoint import load_checkpoint, load_head
from spool.train import (
    NonFiniteLossError,
    ResumeMismatchError,
    TrainConfig,
    TrainError,
    load_features,
    lr_factor,
    make_optimizer,
    resolve_lookahead,
    train_head,
)

TINY = dict(depth=1, num_heads=2, dim=8, local_frame_range=1, epochs=2, batch_size=4, workers=1, lr=3e-3, warmup=0.5)


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "feats.zarr"
    make_store(path, num_videos=10, num_classes=2, T=4, L=4, D=8, signal=2.0).close()
    return str(path)


def config(store_path, out, **kw):
    return TrainConfig(store=store_path, out=str(out), **{**TINY, **kw})


def weights(out, name="checkpoint_last.pt"):
    return load_checkpoint(out / name)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_same_seed_gives_identical_metrics_and_weights(store_path, tmp_path):
    r1 = train_head(config(store_path, tmp_path / "a", dropout=0.1), progress=False)
    r2 = train_head(config(store_path, tmp_path / "b", dropout=0.1), progress=False)
    m1 = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for e1, e2 in zip(m1["epochs"], m2["epochs"]):
        for timing in ("clips_per_s", "eval_videos_per_s"):
            e1.pop(timing), e2.pop(timing)
        assert e1 == e2
    assert r1.final == r2.final
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    r3 = train_head(config(store_path, tmp_path / "c", dropout=0.1, seed=1, epochs=1), progress=False)
    assert r3.history[0].train_loss != r1.history[0].train_loss  # the seed does reach the run


def test_resume_equals_uninterrupted_run(store_path, tmp_path):
    full = train_head(config(store_path, tmp_path / "full", dropout=0.1), progress=False)

    class Killed(Exception):
        pass

    def kill_after_first(record):
        if record.epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train_head(config(store_path, tmp_path / "part", dropout=0.1), progress=False, on_epoch_end=kill_after_first)
    assert load_checkpoint(tmp_path / "part" / "checkpoint_last.pt")["epoch"] == 1
    resumed = train_head(config(store_path, tmp_path / "part", dropout=0.1, resume=True), progress=False)
    assert [h.epoch for h in resumed.history] == [1, 2]
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in full.history]
    assert resumed.final == full.final
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_resume_refuses_other_options(store_path, tmp_path):
    train_head(config(store_path, tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(ResumeMismatchError, match=r"lr .*depth|depth.*lr"):
        train_head(config(store_path, tmp_path / "run", epochs=1, lr=1e-2, depth=2, resume=True), progress=False)
    # options that do not change the result may differ
    train_head(config(store_path, tmp_path / "run", epochs=1, resume=True, cache="none", workers=2), progress=False)


def test_nan_loss_stops_without_a_broken_checkpoint(tmp_path):
    path = tmp_path / "inf.zarr"
    store = make_store(path, num_videos=6, num_classes=2, T=4, L=4, D=8)
    store.close()
    # an absurd learning rate blows the weights up within a few steps
    cfg = TrainConfig(store=str(path), out=str(tmp_path / "run"), **{**TINY, "lr": 1e30, "grad_clip": 0.0, "epochs": 3})
    with pytest.raises(NonFiniteLossError, match="lower --lr"):
        train_head(cfg, progress=False)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        p = tmp_path / "run" / name
        if p.exists():  # an earlier, finite epoch may have been saved; it must be finite
            assert all(torch.isfinite(v).all() for v in load_checkpoint(p)["model"].values())


def test_inf_features_raise_non_finite_loss(tmp_path):
    from spool.stores import open_store

    path = tmp_path / "inf.zarr"
    make_store(path, num_videos=6, num_classes=2, T=4, L=4, D=8).close()
    store = open_store(path, mode="a")
    p = np.full((2, 4, 4, 8), np.inf, np.float16)
    store.write_video(0, p, p[:, :, 0], np.tile(np.arange(4), (2, 1)), num_frames=4, fps=25.0)
    store.close()
    for head in ("spool", "mean-linear"):
        cfg = TrainConfig(store=str(path), out=str(tmp_path / head), head=head, **{**TINY, "batch_size": 12})
        with pytest.raises(NonFiniteLossError, match="inf/NaN"):
            train_head(cfg, progress=False)
        assert not (tmp_path / head / "checkpoint_last.pt").exists()


def test_outputs_are_written_and_well_formed(store_path, tmp_path, capsys):
    out = tmp_path / "run"
    result = train_head(config(store_path, out, lookahead=1, epochs=3), progress=True)
    printed = capsys.readouterr().err
    assert "epoch 3:" in printed and "train-head (" not in printed  # per-epoch lines, not also a table
    for name in ("config.json", "metrics.json", "checkpoint_best.pt", "checkpoint_last.pt", "learning_curves.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head"] == "spool" and cfg["head_config"]["num_lookahead_heads"] == 1
    assert cfg["head_config"]["depth"] == 1 and cfg["train"]["lr"] == TINY["lr"]
    assert cfg["store"]["fingerprint"] and cfg["store"]["path"].endswith("feats.zarr")
    assert cfg["splits"]["source"] == "drawn" and cfg["splits"]["val"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    final = metrics["final"]
    assert final["top5"] is None and final["top_k"]["k"] == 2  # 2 classes: top-2 reported instead
    cm = np.array(final["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == final["num_videos"] == cfg["splits"]["val"] // 2
    assert final["top1"] == pytest.approx(np.trace(cm) / cm.sum())
    assert result.top1 == final["top1"] and result.history[-1].clips_per_s > 0
    assert result.top1 == 1.0  # the Spool head learns the trivially separable classes
    assert 0 <= metrics["epochs"][-1]["lr"] < TINY["lr"]
    # the checkpoint rebuilds the head without repeating options, and gives the same logits
    model, saved = load_head(out / "checkpoint_last.pt")
    assert saved["head_config"]["num_lookahead_heads"] == 1 and saved["train"]["token_pool"] == 1
    features, splits = load_features(config(store_path, out, cache="memory"))
    batch = next(features.batches(splits.val, 4))
    with torch.no_grad():
        logits = model(batch["patches"].float())
    assert logits.shape == (len(batch["label"]), 2) and torch.isfinite(logits).all()


def test_baselines_train_and_learn(store_path, tmp_path):
    # class signal of 2 sigma per channel: trivially separable, by any head
    for head, extra in (("mean-linear", {"norm": "layernorm"}), ("attentive-probe", {"temporal_embedding": True})):
        r = train_head(config(store_path, tmp_path / head, head=head, epochs=4, lr=1e-2, **extra), progress=False)
        assert r.top1 == 1.0, head
        assert r.history[-1].train_loss < r.history[0].train_loss
        model, saved = load_head(tmp_path / head / "checkpoint_best.pt")
        assert saved["head"] == head and all(saved["head_config"][k] == v for k, v in extra.items())


def test_shared_feature_set_gives_the_same_run(store_path, tmp_path):
    cfg = config(store_path, tmp_path / "own", cache="memory", epochs=1)
    own = train_head(cfg, progress=False)
    own_linear = train_head(config(store_path, tmp_path / "own_linear", head="mean-linear", epochs=1), progress=False)
    features, _ = load_features(cfg, inputs=("patches", "cls"))  # one set serves every head
    assert features.cache == "memory"
    reads = []
    features.store.read_patches = lambda *a, **k: reads.append(a)  # loaded once: no further reads
    shared = train_head(config(store_path, tmp_path / "shared", epochs=1), features=features, progress=False)
    assert own.final == shared.final
    linear = train_head(config(store_path, tmp_path / "linear", head="mean-linear", epochs=1), features=features, progress=False)
    assert linear.final == own_linear.final
    assert reads == []
    with pytest.raises(TrainError, match="token_pool"):
        train_head(config(store_path, tmp_path / "pool", token_pool=2), features=features, progress=False)


def test_weight_decay_only_on_linear_weights():
    from spool.model import HeadConfig, SpoolHead

    model = SpoolHead(HeadConfig(in_dim=8, num_frames=4, num_tokens=4, num_classes=2, dim=8, depth=1, num_heads=2, num_lookahead_heads=1), device="cpu")
    decay, other = make_optimizer(model, lr=1e-3, weight_decay=0.05).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    # the temporal embedding and the context frames are 2-D but are embeddings, not layer weights
    assert {"framing.time_embed", "framing.start", "framing.end"} <= {names[id(p)] for p in other["params"]}
    assert decayed == {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 2}
    assert decay["weight_decay"] == 0.05 and other["weight_decay"] == 0.0


def test_schedule_and_lookahead_resolution():
    f = [lr_factor(s, 4, 20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] < 0.05
    assert resolve_lookahead(6, 4, None) == 4 and resolve_lookahead(6, None, 4) == 2
    assert resolve_lookahead(6, None, None) == 3 and resolve_lookahead(2, None, None) == 1
    with pytest.raises(TrainError, match="must equal --heads 6"):
        resolve_lookahead(6, 4, 4)


def test_a_lone_last_clip_is_dropped_so_batchnorm_heads_train(store_path, tmp_path):
    features, splits = load_features(config(store_path, tmp_path / "probe"))
    features.store.close()
    batch_size = len(splits.train) - 1  # the last batch of each epoch would hold one clip
    assert len(splits.train) % batch_size == 1
    r = train_head(config(store_path, tmp_path / "linear", head="mean-linear", batch_size=batch_size, epochs=2),
                   progress=False)
    assert len(r.history) == 2 and np.isfinite(r.history[-1].train_loss)


def test_final_and_best_are_reported_apart(store_path, tmp_path):
    result = train_head(config(store_path, tmp_path / "run", epochs=4, lr=3e-2), progress=False)
    top1 = [h.eval_top1 for h in result.history]
    best_epoch = int(np.argmax(top1)) + 1  # the first epoch with the highest val top-1
    assert result.top1 == top1[-1]
    assert result.best == {"epoch": best_epoch, "top1": top1[best_epoch - 1], "chosen_on": "val", "select_top1": None}
    line = result.result_line()
    assert f"final val top-1 {100 * top1[-1]:.1f}% (epoch 4)" in line
    assert f"best epoch {best_epoch}: {100 * top1[best_epoch - 1]:.1f}%, chosen on the same val split, so optimistic" in line
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best"]["chosen_on"] == "val" and metrics["final"]["top1"] == top1[-1]


def test_val_from_train_chooses_the_best_epoch_on_held_out_train_videos(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path, num_videos=24, num_classes=2, T=4, L=4, D=8, signal=0.5).close()
    plain = train_head(config(str(path), tmp_path / "plain", epochs=1), progress=False)
    result = train_head(config(str(path), tmp_path / "held", epochs=5, lr=3e-2, val_from_train=0.25), progress=False)
    saved = json.loads((tmp_path / "held" / "config.json").read_text())
    assert saved["train"]["val_from_train"] == 0.25
    splits = saved["splits"]
    assert splits["val_from_train"] == 0.25 and splits["select"] > 0
    assert splits["val"] == plain.config["splits"]["val"]  # the reported split is the same videos
    assert splits["train"] + splits["select"] == plain.config["splits"]["train"]
    chosen = [h.select_top1 for h in result.history]
    assert all(c is not None for c in chosen)
    best_epoch = int(np.argmax(chosen)) + 1
    assert result.best["epoch"] == best_epoch and result.best["chosen_on"] == "val-from-train"
    assert result.best["top1"] == result.history[best_epoch - 1].eval_top1  # reported on val, chosen elsewhere
    assert load_checkpoint(tmp_path / "held" / "checkpoint_best.pt")["epoch"] == best_epoch
    assert "chosen on the 0.25 of train held out" in result.result_line()


def test_a_run_folder_with_other_options_is_refused_unless_overwrite(store_path, tmp_path):
    out = tmp_path / "run"
    first = train_head(config(store_path, out), progress=False)
    with pytest.raises(TrainError, match=r"other options; differing: --epochs \(saved 2, asked 3\).*--overwrite"):
        train_head(config(store_path, out, epochs=3), progress=False)
    assert json.loads((out / "metrics.json").read_text())["final"] == first.final  # untouched
    train_head(config(store_path, out), progress=False)  # the same options again: allowed
    resumed = train_head(config(store_path, out, resume=True), progress=False)  # its checkpoint, finished
    assert resumed.final == first.final
    replaced = train_head(config(store_path, out, epochs=1, lr=1e-3, overwrite=True), progress=False)
    assert len(replaced.history) == 1
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3
    other = tmp_path / "other.zarr"
    make_store(other, num_videos=10, num_classes=2, T=4, L=4, D=8, seed=5).close()
    with pytest.raises(TrainError, match="the store"):
        train_head(config(str(other), out, epochs=1, lr=1e-3), progress=False)


def test_a_differing_run_is_described_in_option_names():
    from spool.train import option_diff

    assert option_diff("local_frame_range", 2, 1) == "--range (saved 2, asked 1)"
    assert option_diff("num_heads", 6, 4) == "--heads (saved 6, asked 4)"
    assert option_diff("context_frames", True, False) == "--no-context (saved False, asked True)"
    assert option_diff("weight_decay", 0.05, 0.1) == "--weight-decay (saved 0.05, asked 0.1)"


def test_argument_errors_name_the_option_and_leave_no_run_folder(store_path, tmp_path):
    from typer.testing import CliRunner

    from spool.cli.app import app

    out = tmp_path / "run"
    cases = [
        (["--range", "-1"], "--range must be >= 0"),
        (["--depth", "0"], "--depth must be >= 1"),
        (["--heads", "2", "--lookahead", "3"], "--lookahead 3 leaves 3 lookahead heads; it must be between 0 and --heads 2"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--val-from-train", "1"], "--val-from-train must be in [0, 1)"),
        # found once the store's feature width (8) is known: still in option names, not HeadConfig's fields
        (["--heads", "3"], "the features' width 8 (the default --dim) is not divisible by --heads 3"),
        (["--heads", "2", "--dim", "9"], "--dim 9 is not divisible by --heads 2"),
        (["--head", "attentive-probe", "--heads", "3"], "the features' width 8, which --heads 3 does not divide"),
        (["--backend", "fast"], "--backend must be one of auto, flex, blocked, dense; got 'fast'"),
        (["--cache", "disk"], "--cache must be one of auto, none, memory, gpu; got 'disk'"),
        (["--head", "mean-linear", "--norm", "rms"], "--norm must be one of batchnorm, layernorm, none; got 'rms'"),
        (["--heads", "2", "--token-pool", "3"], "--token-pool 3 must divide the patch grid side 2"),
        (["--heads", "2", "--device", "gpu0"], "--device 'gpu0' is not a device; pass auto, cpu, cuda or cuda:N"),
        (["--heads", "2", "--device", "cpu", "--cache", "gpu"], "--cache gpu needs a CUDA device"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["train-head", store_path, "--out", str(out), "-q", *args])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert message in text, result.output
        assert not any(word in text for word in ("HeadConfig", "ProbeConfig", "num_heads", "token_pool", "cache=")), text
        assert not out.exists()
    one_class = tmp_path / "one.zarr"
    make_store(one_class, num_videos=6, num_classes=1, T=4, L=4, D=8).close()
    result = CliRunner().invoke(app, ["train-head", str(one_class), "--out", str(out), "-q"])
    assert result.exit_code == 2 and "one class only (class0)" in result.output, result.output
    assert not out.exists()


def test_quiet_prints_only_the_result_line(store_path, tmp_path):
    from typer.testing import CliRunner

    from spool.cli.app import app

    args = ["train-head", store_path, "--out", str(tmp_path / "run"), "--depth", "1", "--heads", "2", "--dim", "8",
            "--epochs", "2", "--batch-size", "4"]
    quiet = CliRunner().invoke(app, [*args, "-q"])
    assert quiet.exit_code == 0, quiet.output
    lines = quiet.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'run'}: final val top-1"), quiet.output
    loud = CliRunner().invoke(app, [*args, "--overwrite"])
    assert "epoch 1:" in loud.output and "epoch 2:" in loud.output and "final val top-1" in loud.output


def test_runs_from_before_the_motion_options_keep_their_meaning():
    """A config.json or checkpoint written before --correlation and the spatial embedding existed
    lacks their keys; it was trained without them, so resuming matches only those options."""
    from dataclasses import asdict, replace

    from spool.train import TrainConfig, _diff_keys

    old = asdict(TrainConfig(store="s", out="o"))
    del old["spatial_embedding"], old["correlation_range"]
    today = TrainConfig(store="s", out="o")
    assert _diff_keys(old, asdict(today)) == ["correlation_range", "spatial_embedding"]
    assert _diff_keys(old, asdict(replace(today, spatial_embedding=False, correlation_range=None))) == []
    # with --correlation but before its per-token standardisation and position moments: raw cosines
    raw = asdict(replace(today, correlation_range=2))
    del raw["correlation_token_norm"], raw["correlation_moments"]
    assert _diff_keys(raw, asdict(replace(today, correlation_range=2))) == ["correlation_moments", "correlation_token_norm"]
    as_trained = replace(today, correlation_range=2, correlation_token_norm=False, correlation_moments=False)
    assert _diff_keys(raw, asdict(as_trained)) == []
