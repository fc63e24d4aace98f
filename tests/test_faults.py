"""Faults (issue #5): damaged stores found by ``verify``, Ctrl-C, a full disk, SIGKILL of
train-head, NaN features. Each kill or failure is followed by a re-run whose result must
equal an uninterrupted run. docs/reliability.md maps each fault to its test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_data import make_store
from test_extract import _assert_same_content, _extract

from spool.checkpoint import load_checkpoint
from spool.stores import DONE, FAILED, PENDING, open_store
from spool.stores.verify import verify
from spool.train import NonFiniteLossError, TrainConfig, train_head

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from spool.toy import make_toy

    root = tmp_path_factory.mktemp("fault_toy")
    make_toy(root, videos_per_class=2, num_frames=12, size=32, seed=1)  # 6 classes x 2 = 12 videos
    return root


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory) -> Path:
    """The uninterrupted extraction every interrupted one must equal."""
    out = tmp_path_factory.mktemp("fault_ref") / "ref.zarr"
    assert _extract(toy, out).done == 12
    return out


def _cli_extract(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spool", "extract", str(source), "--out", str(out), "--weights", "random",
            "--size", "28", "--frames", "4", "--batch-size", "6", "-q", *extra]


# --- verify ----------------------------------------------------------------------------------


def _damaged(tmp_path, suffix, **kw) -> Path:
    path = tmp_path / f"s{suffix}"
    make_store(path, num_videos=6, num_classes=3, clips_per_video=2, T=4, L=4, D=8, done=[0, 1, 2, 3, 4], **kw).close()
    return path


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_verify_passes_a_sound_store(tmp_path, suffix):
    report = verify(_damaged(tmp_path, suffix))
    assert report.ok, report.problems
    assert (report.num_videos, report.done, report.pending, report.clips_checked) == (6, 5, 1, 10)
    json.dumps(report.to_dict())  # what `spool verify --json` prints


def test_verify_names_a_missing_zarr_chunk(tmp_path):
    path = _damaged(tmp_path, ".zarr")
    chunk = path / "patches" / "c" / "3" / "0" / "0" / "0"  # clip 3 = view 1 of video 1
    chunk.unlink()
    (problem,) = verify(path).problems
    assert (problem.kind, problem.where, problem.video_id) == ("missing-chunk", str(chunk), "v001.mp4")
    assert "patches chunk of clip 3 is missing" in problem.message


def test_verify_names_a_truncated_and_a_corrupted_chunk(tmp_path):
    path = _damaged(tmp_path, ".zarr")
    cut = path / "patches" / "c" / "4" / "0" / "0" / "0"
    cut.write_bytes(cut.read_bytes()[:100])
    nan = path / "cls" / "c" / "9" / "0" / "0"
    nan.write_bytes(b"\xff" * nan.stat().st_size)  # 0xffff is a float16 NaN
    problems = {p.kind: p for p in verify(path).problems}
    assert problems.keys() == {"bad-chunk", "non-finite"}
    assert problems["bad-chunk"].where == str(cut) and problems["bad-chunk"].video_id == "v002.mp4"
    assert "holds 100 bytes" in problems["bad-chunk"].message
    assert problems["non-finite"].where == str(nan) and problems["non-finite"].video_id == "v004.mp4"


def test_verify_finds_nan_and_lost_clips_in_hdf5(tmp_path):
    path = _damaged(tmp_path, ".h5")
    with h5py.File(path, "r+", locking=False) as f:
        f["patches"][2, 1, 0, 0] = np.inf
        f["cls"][7] = 0  # a clip whose bytes never reached the disk reads as zeros
    problems = sorted((p.kind, p.where, p.video_id) for p in verify(path).problems)
    assert problems == [("non-finite", f"{path}:patches[2]", "v001.mp4"), ("zero", f"{path}:cls[7]", "v003.mp4")]


def test_verify_detects_damaged_tables(tmp_path):
    path = _damaged(tmp_path, ".zarr")
    (path / "label" / "c" / "0").unlink()  # labels now read as the fill value, 0
    problems = verify(path).problems
    assert [p.kind for p in problems] == ["fingerprint"]
    path = _damaged(tmp_path / "b", ".zarr")
    (path / "status" / "c" / "0").write_bytes(b"garbage")
    (problem,) = verify(path).problems
    assert problem.kind == "bad-chunk" and "cannot be read" in problem.message


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_verify_reports_a_store_that_does_not_open(tmp_path, suffix):
    path = _damaged(tmp_path, suffix)
    if suffix == ".zarr":
        shutil.rmtree(path / "cls")
        expected = "array 'cls' is missing"
    else:  # a store from a newer Spool (test_stores.test_newer_schema_refused covers open_store)
        with h5py.File(path, "r+", locking=False) as f:
            f.attrs["schema_version"] = json.dumps(99)
        expected = "newer Spool"
    (problem,) = verify(path).problems
    assert problem.kind == "open" and expected in problem.message


def test_verify_of_an_extracted_store_and_of_no_store(reference, tmp_path):
    report = verify(reference)
    assert report.ok and report.done == 12, report.problems
    with pytest.raises(Exception, match="no store at"):
        verify(tmp_path / "absent.zarr")


# --- NaN / inf features ----------------------------------------------------------------------


def test_nan_features_are_named_by_verify_and_stop_training(tmp_path):
    path = tmp_path / "nan.zarr"
    make_store(path, num_videos=6, num_classes=2, T=4, L=4, D=8).close()
    with open_store(path, mode="a") as store:
        p = np.full((2, 4, 4, 8), np.nan, np.float16)
        store.write_video(0, p, p[:, :, 0], np.tile(np.arange(4), (2, 1)), num_frames=4, fps=25.0)
    assert {p.video_id for p in verify(path).problems} == {"v000.mp4"}
    cfg = TrainConfig(store=str(path), out=str(tmp_path / "run"), depth=1, num_heads=2, dim=8, epochs=1, batch_size=12)
    with pytest.raises(NonFiniteLossError, match="inf/NaN"):
        train_head(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


# --- Ctrl-C ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_toy(tmp_path_factory) -> Path:
    """More videos than `toy`, so that Ctrl-C lands between the first finished video and the last."""
    from spool.toy import make_toy

    root = tmp_path_factory.mktemp("long_toy")
    make_toy(root, videos_per_class=8, num_frames=12, size=32, seed=2)  # 48 videos
    return root


@pytest.fixture(scope="module")
def interrupted(long_toy, tmp_path_factory):
    """(returncode, stderr, store) of a CLI extract that got Ctrl-C after its first finished video."""
    out = tmp_path_factory.mktemp("interrupted") / "interrupted.zarr"
    # start_new_session: SIGINT goes to the extract's process group (as a terminal's Ctrl-C
    # does, decode workers included), not to pytest
    # preexec_fn: a terminal's Ctrl-C reaches a process whose SIGINT is at its default; a CI
    # harness that started the suite in the background (bash `cmd &` without job control)
    # leaves it ignored, and the extract would never see it
    proc = subprocess.Popen(_cli_extract(long_toy, out, "--workers", "1"), env=ENV, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "status").exists():
            try:
                with open_store(out) as store:  # readers take no lock
                    if (store.videos().status == DONE).any():
                        break
            except Exception:  # the store may be mid-creation
                pass
        time.sleep(0.02)
    sent = proc.poll() is None
    if sent:
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert sent, "the extract finished before Ctrl-C; the test proves nothing"
    return proc.returncode, stderr, out


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_store_and_marks_nothing_failed(interrupted, long_toy, tmp_path):
    returncode, stderr, out = interrupted
    assert returncode != 0
    with open_store(out) as store:
        status = store.videos().status
    assert not (status == FAILED).any(), "an interrupted video was recorded as failed"
    assert (status == PENDING).any(), "nothing was left to resume; the test proves nothing"
    assert (status == DONE).any(), "Ctrl-C came before any video finished"
    report = verify(out)
    assert report.ok, report.problems
    _extract(long_toy, out)  # the same options, in-process: resumes
    reference = tmp_path / "reference.zarr"
    _extract(long_toy, reference)
    _assert_same_content(reference, out)


@pytest.mark.slow
def test_ctrl_c_exits_130(interrupted):
    returncode, stderr, _ = interrupted
    assert returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr


# --- disk full -------------------------------------------------------------------------------


def _small_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    return ok


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_disk_full_is_a_clear_error_and_the_store_resumes(toy, reference, tmp_path, suffix):
    mnt = tmp_path / "disk"
    if not _small_tmpfs(mnt, "160k"):  # 160 KiB: the empty store fits, not all 12 videos
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); RLIMIT_FSIZE variant below")
    try:
        out = mnt / f"full{suffix}"
        full = subprocess.run(_cli_extract(toy, out, "--workers", "0"), env=ENV, capture_output=True, text=True, timeout=300)
        assert full.returncode == 2, full.stderr
        message = " ".join(full.stderr.split())
        assert "No space left on device" in message and "re-run the same command" in message, message
        assert "Traceback" not in full.stderr
        with open_store(out) as store:
            status = store.videos().status
        assert (status == DONE).sum() < 12 and not (status == FAILED).any()
        assert verify(out).ok
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        assert _extract(toy, out).done == 12 - (status == DONE).sum()  # same options, in-process
        _assert_same_content(reference, out)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_file_size_limit_is_a_clear_error_and_the_store_resumes(toy, reference, tmp_path):
    """The same fault without a mount: RLIMIT_FSIZE makes writes past 8 KiB fail (EFBIG),
    so every 12 KiB patches chunk fails while the store's metadata is written."""
    import resource

    out = tmp_path / "limited.zarr"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    limited = subprocess.run(_cli_extract(toy, out, "--workers", "0"), env=ENV, capture_output=True, text=True,
                             timeout=300, preexec_fn=limit)
    assert limited.returncode == 2, limited.stderr
    message = " ".join(limited.stderr.split())
    assert "File too large" in message and "re-run the same command" in message, message
    with open_store(out) as store:
        assert (store.videos().status == PENDING).all()
    assert _extract(toy, out).done == 12  # without the limit, in-process: resumes
    _assert_same_content(reference, out)


# --- SIGKILL of train-head -------------------------------------------------------------------


TRAIN = dict(depth=1, num_heads=2, dim=8, local_frame_range=1, epochs=40, batch_size=4, lr=3e-3, warmup=0.5,
             workers=0, cache="memory", device="cpu", dropout=0.1)
TRAIN_ARGS = ["--depth", "1", "--heads", "2", "--dim", "8", "--range", "1", "--epochs", "40", "--batch-size", "4",
              "--lr", "3e-3", "--warmup", "0.5", "--workers", "0", "--cache", "memory", "--device", "cpu",
              "--dropout", "0.1", "-q"]


@pytest.mark.slow
def test_sigkill_of_train_head_then_resume_equals_an_uninterrupted_run(tmp_path):
    store = tmp_path / "feats.zarr"
    make_store(store, num_videos=10, num_classes=2, T=4, L=4, D=8, signal=2.0).close()
    train_head(TrainConfig(store=str(store), out=str(tmp_path / "full"), **TRAIN), progress=False)
    out = tmp_path / "killed"
    last = out / "checkpoint_last.pt"
    cmd = [sys.executable, "-m", "spool", "train-head", str(store), "--out", str(out), *TRAIN_ARGS, "--resume"]
    epochs_at_kill = []
    for delay in (0.0, 0.15):  # seconds after this run's first new checkpoint
        before = last.stat().st_mtime_ns if last.exists() else None
        proc = subprocess.Popen(cmd, env=ENV)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if last.exists() and last.stat().st_mtime_ns != before:
                break
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.kill()
            epochs_at_kill.append(load_checkpoint(last)["epoch"])
        proc.wait()
    assert len(epochs_at_kill) == 2 and max(epochs_at_kill) < 40, f"kills landed at epochs {epochs_at_kill}"
    # the same run resumed, in-process: options that only change how it runs are free
    train_head(TrainConfig(store=str(store), out=str(out), resume=True, **TRAIN), progress=False)
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint_last.pt"), load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 40
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", out))
    for ea, eb in zip(ma["epochs"], mb["epochs"], strict=True):
        for timing in ("clips_per_s", "eval_videos_per_s"):
            ea.pop(timing), eb.pop(timing)
        assert ea == eb
    assert not list(out.glob("*.tmp"))


def test_resume_from_a_checkpoint_of_another_optimizer_layout_is_a_clear_error(tmp_path):
    from spool.checkpoint import save_checkpoint
    from spool.train import ResumeMismatchError

    store = tmp_path / "feats.zarr"
    make_store(store, num_videos=10, num_classes=2, T=4, L=4, D=8).close()
    cfg = TrainConfig(store=str(store), out=str(tmp_path / "run"), **{**TRAIN, "epochs": 2})

    class Killed(Exception):
        pass

    def kill_after_first(record):
        raise Killed

    with pytest.raises(Killed):
        train_head(cfg, progress=False, on_epoch_end=kill_after_first)
    last = tmp_path / "run" / "checkpoint_last.pt"
    ckpt = load_checkpoint(last)
    groups = ckpt["optimizer"]["param_groups"]  # as an older Spool grouped them: one parameter moved
    groups[0]["params"].append(groups[1]["params"].pop())
    ckpt.pop("checkpoint_version")
    save_checkpoint(last, ckpt)
    with pytest.raises(ResumeMismatchError, match="written by another Spool version"):
        train_head(TrainConfig(**{**cfg.__dict__, "resume": True}), progress=False)
