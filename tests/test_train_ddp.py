"""train-head under torchrun: DistributedDataParallel over gloo with CPU processes gives the
run of one process with the same global batch (weights within float tolerance, the same
metrics), rank 0 alone writes, resume works across world sizes. spool.ddp's parts are in
test_ddp.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_data import make_store
from typer.testing import CliRunner

from spool.checkpoint import load_checkpoint, load_head
from spool.cli.app import app
from spool.distributed import Shard, TorchrunEnv
from spool.train import ResumeMismatchError, TrainConfig, TrainError, load_features, train_head

OUTPUTS = {"config.json", "metrics.json", "checkpoint_best.pt", "checkpoint_last.pt", "learning_curves.png", "confusion_matrix.png"}
TINY = ["--depth", "1", "--heads", "2", "--dim", "8", "--range", "1", "--lr", "3e-3", "--warmup", "0.5",
        "--device", "cpu", "--workers", "1", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """9 videos x 3 clips, 3 classes: a drawn split of 21 train clips and 6 val clips."""
    path = tmp_path_factory.mktemp("ddp") / "feats.zarr"
    make_store(path, num_videos=9, num_classes=3, clips_per_video=3, T=4, L=4, D=8, signal=2.0).close()
    return path


def num_train(store) -> int:
    features, splits = load_features(TrainConfig(store=str(store), out=""))
    features.store.close()
    return len(splits.train)


def single(store, out, *args):
    """The run of one process: the same command, in this process."""
    result = CliRunner().invoke(app, ["train-head", str(store), "--out", str(out), *TINY, *args])
    assert result.exit_code == 0, result.output


def torchrun(*argv, nproc=2):
    """``torchrun --standalone --nproc-per-node N ARGV...``, one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def assert_same_run(a: Path, b: Path):
    wa, wb = load_checkpoint(a / "checkpoint_last.pt"), load_checkpoint(b / "checkpoint_last.pt")
    assert wa["model"].keys() == wb["model"].keys()  # no "module." prefix: loads in one process
    for k in wa["model"]:
        # The key bias of attention has a zero gradient in exact arithmetic (softmax ignores a
        # shift shared by all keys): AdamW turns rounding noise there into steps of ~lr/1000.
        atol = 1e-4 if k.endswith("qkv.bias") else 1e-5
        torch.testing.assert_close(wb["model"][k], wa["model"][k], rtol=1e-5, atol=atol, msg=k)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["final"] == mb["final"] and ma["best"] == mb["best"]
    for ea, eb in zip(ma["epochs"], mb["epochs"], strict=True):
        assert eb.pop("train_loss") == pytest.approx(ea.pop("train_loss"), rel=1e-6)
        for timing in ("clips_per_s", "eval_videos_per_s"):
            ea.pop(timing), eb.pop(timing)
        assert ea == eb


@pytest.mark.slow
def test_torchrun_trains_the_model_of_one_process(store, tmp_path):
    n, batch = num_train(store), 8
    assert n % 2 == 1 and n % batch == 5  # neither divides the train clips: the last batch splits 3 + 2
    args = ["--epochs", "2", "--batch-size", str(batch)]
    single(store, tmp_path / "one", *args)
    torchrun("-m", "spool", "train-head", str(store), "--out", str(tmp_path / "ddp"), *TINY, *args)
    assert_same_run(tmp_path / "one", tmp_path / "ddp")
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == OUTPUTS
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2 and config["train"]["batch_size"] == batch  # the global batch
    model, _ = load_head(tmp_path / "ddp" / "checkpoint_last.pt")  # plain BatchNorm again
    assert type(model.framing.input_norm) is nn.BatchNorm1d


@pytest.mark.slow
def test_resume_under_torchrun_from_a_single_process_checkpoint(store, tmp_path):
    # mean-linear: BatchNorm over (B, D), so a last batch of 3 split 2 + 1 needs synced statistics
    n = num_train(store)
    batch = next(b for b in range(4, n) if n % b == 3)
    args = ["--head", "mean-linear", "--epochs", "3", "--batch-size", str(batch)]
    single(store, tmp_path / "full", *args)
    cfg = TrainConfig(store=str(store), out=str(tmp_path / "part"), head="mean-linear", epochs=3, batch_size=batch,
                      depth=1, num_heads=2, dim=8, local_frame_range=1, lr=3e-3, warmup=0.5, device="cpu", workers=1)  # fmt: skip

    class Killed(Exception):
        pass

    def killed(record):
        raise Killed

    with pytest.raises(Killed):  # after epoch 1, as a killed job
        train_head(cfg, progress=False, on_epoch_end=killed)
    torchrun("-m", "spool", "train-head", str(store), "--out", str(tmp_path / "part"), *TINY, *args, "--resume")
    assert_same_run(tmp_path / "full", tmp_path / "part")
    assert load_checkpoint(tmp_path / "part" / "checkpoint_last.pt")["world_size"] == 2


@pytest.mark.slow
def test_empty_shares_and_only_rank_0_writes(store, tmp_path):
    # 3 processes: the last batch of 2 clips leaves rank 2 an empty share, and the one val batch
    # leaves ranks 1 and 2 nothing to evaluate. Ranks 1 and 2 get their own --out: it stays empty.
    n = num_train(store)
    batch = next(b for b in range(4, n) if n % b == 2)
    args = ["--epochs", "2", "--batch-size", str(batch)]
    single(store, tmp_path / "one", *args)
    script = tmp_path / "per_rank_out.py"
    script.write_text(
        "import os, sys\n"
        "from spool.cli.app import main\n"
        "rank = int(os.environ['RANK'])\n"
        "if rank:\n"
        "    sys.argv[sys.argv.index('--out') + 1] += f'-rank{rank}'\n"
        "main()\n"
    )
    torchrun(str(script), "train-head", str(store), "--out", str(tmp_path / "ddp"), *TINY, *args, nproc=3)
    assert_same_run(tmp_path / "one", tmp_path / "ddp")
    assert {p.name for p in tmp_path.iterdir()} == {"one", "ddp", script.name}


# --- the parts, in one process or two spawned ones -------------------------------------------


def test_batch_shards_are_the_batch(store):
    features, splits = load_features(TrainConfig(store=str(store), out="", cache="none", workers=1))
    whole = [b["clip"].tolist() for b in features.batches(splits.train, 5, shuffle=True, seed=3, epoch=1)]
    parts = [
        [b["clip"].tolist() for b in features.batches(splits.train, 5, shuffle=True, seed=3, epoch=1, shard=shard)]
        for shard in (Shard(0, 3), Shard(1, 3), Shard(2, 3))
    ]
    assert [sum((p[s] for p in parts), []) for s in range(len(whole))] == whole
    features.store.close()


def test_every_head_runs_an_empty_share_and_reaches_every_weight():
    import dataclasses

    from spool.baselines import AttentiveProbe, AttentiveProbeConfig, MeanLinearConfig, MeanLinearHead
    from spool.model import HeadConfig, SpoolHead

    spool = HeadConfig(in_dim=8, num_frames=4, num_tokens=4, num_classes=3, dim=8, depth=1, num_heads=2,
                       num_lookahead_heads=1)  # fmt: skip
    probe = AttentiveProbeConfig(in_dim=8, num_classes=3, num_frames=4, num_heads=2, temporal_embedding=True)
    heads = [
        (SpoolHead(spool, device="cpu"), "patches"),
        (SpoolHead(dataclasses.replace(spool, attention="full"), device="cpu"), "patches"),
        (SpoolHead(dataclasses.replace(spool, attention="factorized"), device="cpu"), "patches"),
        (AttentiveProbe(probe), "patches"),
        (MeanLinearHead(MeanLinearConfig(in_dim=8, num_classes=3)), "cls"),
    ]
    for model, kind in heads:
        x = torch.zeros((0, 4, 4, 8) if kind == "patches" else (0, 4, 8))
        logits = model.eval()(x)  # eval: a plain BatchNorm cannot take 0 rows in training
        assert logits.shape == (0, 3)
        nn.functional.cross_entropy(logits, torch.zeros(0, dtype=torch.long), reduction="sum").backward()
        # DDP waits for a gradient of every parameter, from every rank
        assert all(p.grad is not None for p in model.parameters()), type(model).__name__


def test_errors_name_the_option(store, tmp_path, monkeypatch):
    from spool.distributed import rank_device

    cfg = TrainConfig(store=str(store), out=str(tmp_path / "run"), batch_size=2)
    with pytest.raises(TrainError, match="--batch-size 2 is the global batch.*at least 4"):
        train_head(cfg, dist=TorchrunEnv(rank=0, world_size=4, local_rank=0))
    fourth = TorchrunEnv(rank=3, world_size=4, local_rank=3)
    with pytest.raises(ValueError, match="pass --device cuda"):
        rank_device("cuda:1", fourth)
    assert rank_device("cpu", fourth) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("cuda", TorchrunEnv(rank=1, world_size=4, local_rank=1)) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK 3 needs GPU cuda:3.*--nproc-per-node to at most 2"):
        rank_device("auto", fourth)


@pytest.mark.slow
def test_resume_with_dropout_needs_the_same_number_of_processes(store, tmp_path):
    cfg = TrainConfig(store=str(store), out=str(tmp_path / "run"), depth=1, num_heads=2, dim=8, epochs=1,
                      batch_size=8, dropout=0.1, device="cpu", workers=1)  # fmt: skip
    train_head(cfg, progress=False)
    path = tmp_path / "run" / "checkpoint_last.pt"
    torch.save({**load_checkpoint(path), "world_size": 2}, path)  # as if 2 processes had trained it
    with pytest.raises(ResumeMismatchError, match="trained by 2 process.*dropout"):
        train_head(TrainConfig(**{**cfg.__dict__, "resume": True}), progress=False)
