"""Stage one end to end: real MP4 files, timm's DINOv2 architecture with seeded random weights."""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spool.backbone import load_backbone, normalize_frames
from spool.cli.app import app
from spool.decode import read_video
from spool.extract import ExtractConfig, run_extract
from spool.stores import DONE, FAILED, StoreError, open_store

SMALL = dict(weights="random", image_size=28, frames=4, workers=0, batch_size=6, seed=0)


def _extract(source: Path, out: Path, **overrides) -> object:
    cfg = ExtractConfig(source=str(source), out=str(out), **{**SMALL, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning is tested in test_backbone
        return run_extract(cfg, progress=False)


def _content(path: Path) -> dict[str, np.ndarray]:
    with open_store(path) as store:
        v, c = store.videos(), store.clips()
        done = np.flatnonzero(c.done)
        return {
            "video_id": np.asarray(v.video_id, dtype=str),
            "status": v.status,
            "num_frames": v.num_frames,
            "label": c.label,
            "frame_indices": c.frame_indices[done],
            "patches": store.read_patches(done),
            "cls": store.read_cls(done),
        }


def _assert_same_content(a: Path, b: Path) -> None:
    ca, cb = _content(a), _content(b)
    for key in ca:
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory) -> Path:
    from spool.toy import make_toy

    root = tmp_path_factory.mktemp("small_toy")
    make_toy(root, videos_per_class=2, num_frames=12, size=32, seed=1)
    return root


@pytest.fixture(scope="module")
def small_store(small_toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "toy.zarr"
    result = _extract(small_toy, out)
    assert result.done == 12 and result.failed == 0
    return out


def test_store_features_equal_backbone_on_the_same_decoded_frames(small_toy, small_store):
    with open_store(small_store) as store:
        v = store.videos()
        assert (v.status == DONE).all()
        idx = 5
        path = small_toy / v.video_id[idx]
        stored_patches = store.read_patches([idx])[0]  # (T, L, D)
        stored_cls = store.read_cls([idx])[0]
        stored_indices = store.clips().frame_indices[idx]
    decoded = read_video(path, frames=4, clips=1, size=28)
    np.testing.assert_array_equal(decoded.frame_indices[0], stored_indices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder, _ = load_backbone("dinov2_vits14", weights="random", image_size=28, seed=0)
    cls, patches = encoder(normalize_frames(torch.from_numpy(decoded.frames[0])))
    assert stored_patches.shape == (4, 4, 384)  # T=4, (28/14)^2 patches, ViT-S width
    # float16 storage: equal up to half-precision rounding
    np.testing.assert_allclose(stored_patches.astype(np.float32), patches.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored_cls.astype(np.float32), cls.numpy(), rtol=2e-3, atol=2e-3)


def test_labels_class_names_and_relative_ids(small_store, small_toy):
    with open_store(small_store) as store:
        v = store.videos()
        names = store.class_names
        for video_id, label in zip(v.video_id, v.label):
            assert (small_toy / video_id).is_file()
            assert video_id.split("/")[0] == names[label]  # folder-per-class: the folder is the class
        assert store.attrs["content"]["weights"]["source"] == "random"
        assert store.attrs["sampling"] == {"frames": 4, "stride": None, "clips": 1}


def test_rerun_skips_finished_videos_and_other_options_are_refused(small_toy, small_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    again = _extract(small_toy, copy)
    assert again.done == 0 and again.skipped == 12
    _assert_same_content(small_store, copy)
    with pytest.raises(StoreError, match="--frames: store has 4, this run asks 8"):
        _extract(small_toy, copy, frames=8)
    with pytest.raises(StoreError, match=r"; --size: store has 28, this run asks 42; --token-pool: store has 1, this run asks 3\)"):
        _extract(small_toy, copy, image_size=42, token_pool=3)  # in option names, not image_size / token_pool
    replaced = _extract(small_toy, copy, frames=2, overwrite=True)
    assert replaced.done == 12
    with open_store(copy) as store:
        assert store.num_frames == 2


def test_zarr_and_hdf5_hold_identical_content(small_toy, small_store, tmp_path):
    h5 = tmp_path / "toy.h5"
    _extract(small_toy, h5)
    _assert_same_content(small_store, h5)


def test_pyav_decoder_gives_the_same_store_as_decord(small_toy, small_store, tmp_path):
    out = tmp_path / "pyav.zarr"
    _extract(small_toy, out, decoder="pyav")
    a, b = _content(small_store), _content(out)
    np.testing.assert_array_equal(a["frame_indices"], b["frame_indices"])
    # Same pixels on these files (see test_decode), hence the same features.
    np.testing.assert_array_equal(a["patches"], b["patches"])


def test_multiple_clips_and_stride_sampling(small_toy, tmp_path):
    out = tmp_path / "views.zarr"
    _extract(small_toy, out, clips=2, stride=2, frames=3)
    with open_store(out) as store:
        c = store.clips()
        assert store.num_clips == 24
        assert (c.view_index.reshape(12, 2) == [0, 1]).all()
        assert (np.diff(c.frame_indices, axis=1) == 2).all()
        assert (c.frame_indices[1::2, 0] > c.frame_indices[0::2, 0]).all()  # two distinct views


def test_bad_videos_are_recorded_and_skipped(small_toy, tmp_path):
    src = tmp_path / "mixed"
    shutil.copytree(small_toy / "growing", src / "growing")
    (src / "growing" / "empty.mp4").write_bytes(b"")
    (src / "growing" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    good = (src / "growing" / "growing_000.mp4").read_bytes()
    (src / "growing" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    result = _extract(src, tmp_path / "mixed.zarr")
    assert result.done == 2
    assert result.failed == 3
    reasons = dict(result.failures)
    assert set(reasons) == {"growing/empty.mp4", "growing/noise.mp4", "growing/truncated.mp4"}
    assert all(reasons.values())
    with open_store(tmp_path / "mixed.zarr") as store:
        v = store.videos()
        failed = {vid: err for vid, err, s in zip(v.video_id, v.error, v.status) if s == FAILED}
        assert failed == reasons


def test_cli_passes_options_to_the_library_and_exits_nonzero_when_nothing_was_extracted(small_toy, tmp_path, monkeypatch):
    seen = {}

    def fake_run_extract(cfg, *, command, progress, torchrun):
        seen["cfg"], seen["command"], seen["progress"], seen["torchrun"] = cfg, command, progress, torchrun
        from spool.extract import ExtractResult

        return ExtractResult(store=cfg.out, done=3, total_done=3)

    monkeypatch.setattr("spool.extract.run_extract", fake_run_extract)
    args = ["extract", str(small_toy), "--out", str(tmp_path / "x.zarr"), "--frames", "8", "--stride", "4",
            "--clips", "3", "--size", "112", "--token-pool", "2", "--decoder", "pyav", "--weights", "random", "-q",
            "--shard", "1/4"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.frames, cfg.stride, cfg.clips, cfg.image_size, cfg.token_pool, cfg.decoder, cfg.weights) == (
        8, 4, 3, 112, 2, "pyav", "random")
    assert (cfg.shard.index, cfg.shard.count) == (1, 4) and seen["torchrun"] is None
    assert seen["progress"] is False

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp4").write_bytes(b"not a video")
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["extract", str(bad), "--out", str(tmp_path / "bad.zarr"), "--weights", "random",
                                      "--size", "28", "--frames", "2", "--workers", "0", "-q"])
    assert result.exit_code == 1
    assert "no video was extracted" in result.output


def test_invalid_options_are_clear_errors(small_toy, tmp_path):
    result = CliRunner().invoke(app, ["extract", str(small_toy), "--out", str(tmp_path / "x.zarr"), "--frames", "0"])
    assert result.exit_code == 2
    assert "--frames must be >= 1" in result.output
    result = CliRunner().invoke(app, ["extract", str(small_toy), "--out", str(tmp_path / "x.parquet"),
                                      "--weights", "random"])
    assert result.exit_code == 2
    assert ".zarr" in result.output


def _extract_cmd(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "spool", "extract", str(source), "--out", str(out), "--weights", "random",
            "--size", "28", "--frames", "4", "--workers", "1", "--batch-size", "6", "-q"]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(small_toy, small_store, tmp_path):
    out = tmp_path / "killed.zarr"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rng = np.random.default_rng(0)
    kills = 0
    for delay in sorted(rng.uniform(2.5, 7.0, size=3)):
        proc = subprocess.Popen(_extract_cmd(small_toy, out), env=env)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the extract finished before any kill; the test proves nothing"
    subprocess.run(_extract_cmd(small_toy, out), env=env, check=True, timeout=300)
    _assert_same_content(small_store, out)


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_holds_the_store(small_toy, small_store, tmp_path):
    out = tmp_path / "busy.zarr"
    shutil.copytree(small_store, out)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open_store(out, mode="a"):  # another writer holds the store
        second = subprocess.run(_extract_cmd(small_toy, out), env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert "spool extract" in second.stderr and str(os.getpid()) in second.stderr, second.stderr


def test_short_videos_repeat_frames_and_are_counted(tmp_path):
    from spool.stores.summary import summarize
    from spool.toy import write_video

    src = tmp_path / "short"
    rng = np.random.default_rng(0)
    write_video(src / "a" / "three_frames.mp4", rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    write_video(src / "a" / "ten_frames.mp4", rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8))
    result = _extract(src, tmp_path / "short.zarr")  # T = 4
    assert result.done == 2 and result.short == 1
    with open_store(tmp_path / "short.zarr") as store:
        v, c = store.videos(), store.clips()
        short = list(v.video_id).index("a/three_frames.mp4")
        assert v.num_frames[short] == 3
        assert sorted(set(c.frame_indices[short].tolist())) == [0, 1, 2]  # 4 indices over 3 frames: one repeats
        assert summarize(store)["short_videos"] == 1


def test_bad_backbone_size_and_out_are_refused_before_the_backbone_loads(small_toy, tmp_path, monkeypatch):
    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the options were checked")

    monkeypatch.setattr("spool.extract.load_backbone", no_backbone)
    runner = CliRunner()
    base = ["extract", str(small_toy), "--weights", "random", "--frames", "2", "--workers", "0", "-q"]
    cases = [
        (["--out", str(tmp_path / "a.zarr"), "--backbone", "resnet50"], "not a Vision Transformer"),
        (["--out", str(tmp_path / "a.zarr"), "--size", "20"], "--size 20 is not a multiple"),
        (["--out", str(tmp_path / "feats.npy")], "--out"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "feats.npy").exists()


def test_pretrained_weights_offline_fail_before_decoding(small_toy, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from spool.backbone import WeightsError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("spool.extract.load_source", lambda *a, **k: pytest.fail("videos were listed first"))
    cfg = ExtractConfig(source=str(small_toy), out=str(tmp_path / "x.zarr"), weights="pretrained", image_size=28)
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        run_extract(cfg, progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_videos_without_class_folders_are_warned_about_and_train_head_says_why(small_toy, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(small_toy.rglob("*.mp4"))[:6]:
        shutil.copy(p, flat / f"{p.parent.name}_{p.name}")
    out = tmp_path / "flat.zarr"
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(flat), "--out", str(out), "--weights", "random", "--size", "28",
                                 "--frames", "2", "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"warning: 6 videos lie directly in {flat}, not in a class sub-folder" in text
    assert text.count("warning: backbone dinov2_vits14: RANDOM weights") == 1  # once, one line, also under -q
    assert "UserWarning" not in text and "extract.py" not in text
    trained = runner.invoke(app, ["train-head", str(out), "--out", str(tmp_path / "run"), "-q"])
    assert trained.exit_code == 2
    assert "all 6 finished videos of the store are unlabeled" in " ".join(trained.output.split())
    assert "run `spool extract` first" not in trained.output
    labeled = runner.invoke(app, ["extract", str(small_toy), "--out", str(tmp_path / "ok.zarr"), "--weights", "random",
                                  "--size", "28", "--frames", "2", "--workers", "0", "-q"])
    assert "class sub-folder" not in labeled.output


def test_a_missing_chunk_of_a_done_video_fails_loudly_and_verify_repair_restores_the_store(
    small_toy, small_store, tmp_path
):
    from spool.stores.verify import verify

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(small_store, damaged)
    lost = damaged / "patches" / "c" / "3" / "0" / "0" / "0"  # video 3's only clip
    lost.unlink()
    cut = damaged / "cls" / "c" / "7" / "0" / "0"
    cut.write_bytes(cut.read_bytes()[:10])
    with open_store(damaged) as store:
        with pytest.raises(StoreError, match=r"patches chunk of clip 3 .* is missing, but the video is DONE.*--repair"):
            store.read_patches([2, 3])
    runner = CliRunner()
    plain = runner.invoke(app, ["verify", str(damaged)])
    assert plain.exit_code == 1 and "spool verify --repair" in plain.output
    repaired = runner.invoke(app, ["verify", str(damaged), "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: 2 videos marked pending" in repaired.output
    with open_store(damaged) as store:
        status = store.videos().status
    assert status[3] != DONE and status[7] != DONE and (np.delete(status, [3, 7]) == DONE).all()
    result = _extract(small_toy, damaged)  # the same options as small_store's
    assert result.done == 2 and result.skipped == 10
    assert verify(damaged).ok
    _assert_same_content(small_store, damaged)


def test_a_lost_clip_of_a_done_video_in_hdf5_is_refused_and_verify_repair_restores_the_store(
    small_toy, small_store, tmp_path
):
    """HDF5 reads a lost clip as zeros without an error: training refuses it (spool.data), and
    verify --repair then the same extract command give the undamaged store back."""
    import h5py

    from spool.data import FeatureSet, FeatureSetError
    from spool.stores.verify import verify

    damaged = tmp_path / "damaged.h5"
    _extract(small_toy, damaged)
    with h5py.File(damaged, "r+", locking=False) as f:
        f["patches"][5] = 0  # video 5's only clip: its bytes never reached the disk
    with open_store(damaged) as store:
        with pytest.raises(FeatureSetError, match=r"clip 5 .* read as all zeros.*--repair"):
            FeatureSet(store, np.arange(12), cache="memory")
    repaired = CliRunner().invoke(app, ["verify", str(damaged), "--repair"])
    assert repaired.exit_code == 0 and "repaired: 1 videos marked pending" in repaired.output, repaired.output
    result = _extract(small_toy, damaged)
    assert result.done == 1 and result.skipped == 11
    assert verify(damaged).ok
    _assert_same_content(small_store, damaged)


def test_default_workers_follow_the_cores_and_the_device():
    from spool.extract import default_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    table = {  # (device, cores) -> decode workers
        (cpu, 1): 0, (cpu, 2): 0, (cpu, 3): 1, (cpu, 4): 1, (cpu, 8): 2, (cpu, 64): 16,
        (gpu, 1): 1, (gpu, 2): 1, (gpu, 16): 15, (gpu, 96): 16,
    }  # fmt: skip
    assert {k: default_workers(*k) for k in table} == table


def test_workers_not_given_reach_the_config_as_none_and_the_help_says_how_they_are_chosen(monkeypatch, tmp_path):
    seen = {}

    def fake_run_extract(cfg, **kw):
        from spool.extract import ExtractResult

        seen["workers"] = cfg.workers
        return ExtractResult(store=cfg.out, done=1, total_done=1, workers=0)

    monkeypatch.setattr("spool.extract.run_extract", fake_run_extract)
    said = CliRunner().invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "f.zarr")])
    assert said.exit_code == 0, said.output
    assert seen["workers"] is None and "no decode workers, the default here" in said.output
    CliRunner().invoke(app, ["extract", str(tmp_path), "--out", str(tmp_path / "f.zarr"), "--workers", "3"])
    assert seen["workers"] == 3
    help_text = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "300"}).output
    words = " ".join(w for w in help_text.split() if w != "│")
    assert "with a GPU, one per core but one" in words and "CPU-only, 0 on 1-2 cores" in words
