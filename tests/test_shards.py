"""Several writers, one store: the shard rule, journals, merging, `--shard i/n` and torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spool.cli.app import app
from spool.distributed import Shard, parse_shard, torchrun_env
from spool.stores import DONE, PENDING, StoreError, create_store, open_store
from spool.stores.shards import (
    ShardWriter, merge_shards, read_journal, shard_report, shard_videos, shards_dir,
)  # fmt: skip
from test_ddp import _free_port
from test_extract import _assert_same_content, _extract_cmd, small_store, small_toy  # noqa: F401  (fixtures)

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages at the terminal width


# --- the pure parts -----------------------------------------------------------------------


def test_shard_rule_by_hand():
    assert shard_videos(10, 0, 3).tolist() == [0, 3, 6, 9]
    assert shard_videos(10, 1, 3).tolist() == [1, 4, 7]
    assert shard_videos(10, 2, 3).tolist() == [2, 5, 8]
    assert shard_videos(2, 3, 4).tolist() == []  # more shards than videos: some get none
    assert shard_videos(5, 0, 1).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_videos,count", [(1, 1), (7, 2), (100, 8), (13, 13), (3, 5)])
def test_shards_cover_every_video_exactly_once(num_videos, count):
    owned = np.concatenate([shard_videos(num_videos, i, count) for i in range(count)])
    assert sorted(owned.tolist()) == list(range(num_videos))


def test_parse_shard_and_its_errors():
    assert parse_shard("3/8") == Shard(3, 8)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1) and Shard().whole
    for bad in ("8/8", "-1/4", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="i/n"):
            parse_shard(bad)


def test_torchrun_env():
    assert torchrun_env({}) is None
    assert torchrun_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # a lone process is not sharded
    env = torchrun_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)


# --- ShardWriter and merging on hand-made stores --------------------------------------------

C, T, L, D = 2, 3, 4, 8


def _new_store(path: Path, num_videos: int = 7):
    return create_store(
        path, video_ids=[f"v{i}" for i in range(num_videos)], labels=[i % 3 for i in range(num_videos)],
        splits=[0] * num_videos, class_names=["a", "b", "c"], clips_per_video=C, num_frames=T, num_tokens=L,
        dim=D, attrs={},
    )  # fmt: skip


def _video(v: int):
    rng = np.random.default_rng(v)
    patches = rng.standard_normal((C, T, L, D)).astype(np.float16)
    cls = rng.standard_normal((C, T, D)).astype(np.float16)
    frame_indices = np.arange(C * T).reshape(C, T) + v
    return patches, cls, frame_indices, 30 + v, 25.0 + v / 7


def _snapshot(path: Path) -> dict:
    with open_store(path) as s:
        v, c = s.videos(), s.clips()
        return {
            "status": v.status, "num_frames": v.num_frames, "fps": v.fps, "error": np.asarray(v.error, dtype=str),
            "frame_indices": c.frame_indices, "patches": s.read_patches(np.arange(s.num_clips)),
            "cls": s.read_cls(np.arange(s.num_clips)),
        }  # fmt: skip


def _write_reference(path: Path, failed: int) -> None:
    with _new_store(path) as s:
        for v in range(s.num_videos):
            if v == failed:
                s.mark_failed(v, "broken: moov atom not found")
            else:
                s.write_video(v, *_video(v))


@pytest.fixture(params=[".zarr", ".h5"])
def suffix(request):
    return request.param


def test_shards_writing_side_by_side_merge_into_the_single_writer_store(tmp_path, suffix):
    reference, sharded = tmp_path / f"ref{suffix}", tmp_path / f"sharded{suffix}"
    _write_reference(reference, failed=4)
    _new_store(sharded).close()
    writers = [ShardWriter(sharded, i, 3) for i in range(3)]  # all open at once
    with pytest.raises(StoreError, match="shards of a sharded one"):
        open_store(sharded, "a")  # an exclusive writer waits for the shards
    with pytest.raises(StoreError, match="already being written"):
        ShardWriter(sharded, 1, 3)
    with pytest.raises(StoreError, match="no store at"):
        ShardWriter(tmp_path / f"absent{suffix}", 0, 3)
    with pytest.raises(StoreError, match="not shard 0/3's"):
        writers[0].write_video(1, *_video(1))
    for v in reversed(range(7)):  # interleaved across shards
        w = writers[v % 3]
        w.mark_failed(v, "broken: moov atom not found") if v == 4 else w.write_video(v, *_video(v))
    with open_store(sharded) as s:  # readers do not see unmerged records
        assert (s.videos().status == PENDING).all()
    for w in writers:
        w.finish()
        w.close()
    report = merge_shards(sharded)
    assert report.complete and report.finished == [0, 1, 2] and report.unmerged_videos == 0
    a, b = _snapshot(reference), _snapshot(sharded)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert sorted(p.name for p in shards_dir(sharded).iterdir()) == [
        f"shard-0000{i}-of-00003.done" for i in range(3)
    ]


def test_merge_reports_unfinished_shards_and_the_pending_videos_by_shard(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    _new_store(path).close()
    with ShardWriter(path, 0, 2) as w:
        for v in shard_videos(7, 0, 2):
            w.write_video(int(v), *_video(int(v)))
        w.finish()
    with ShardWriter(path, 1, 2) as w:  # killed after one video: no finish line
        w.write_video(1, *_video(1))
    report = shard_report(path)
    assert report.unmerged_videos == 5 and report.running_or_killed == [1] and report.finished == [0]
    result = CliRunner().invoke(app, ["merge-shards", str(path)])
    said = _flat(result.output)
    assert result.exit_code == 1, said
    assert "1 of 2 shards finished" in said and "2 videos pending (by shard 1: 2)" in said
    with open_store(path) as s:
        assert s.videos().status.tolist() == [DONE, DONE, DONE, PENDING, DONE, PENDING, DONE]
    with ShardWriter(path, 1, 2) as w:  # the re-run of shard 1 does the rest
        w.write_video(3, *_video(3))
        w.write_video(5, *_video(5))
        w.finish()
    result = CliRunner().invoke(app, ["merge-shards", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["complete"] is True


def test_a_torn_journal_line_is_ignored_and_cut_off_on_resume(tmp_path):
    path = tmp_path / "s.zarr"
    _new_store(path).close()
    with ShardWriter(path, 0, 1) as w:
        w.write_video(0, *_video(0))
        w.write_video(1, *_video(1))
    journal = shards_dir(path) / "shard-00000-of-00001.jsonl"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"video": 2, "stat')  # a kill in the middle of a line
    assert sorted(read_journal(journal).records) == [0, 1]
    with ShardWriter(path, 0, 1) as w:
        w.write_video(2, *_video(2))
    lines = journal.read_bytes().splitlines()
    assert [json.loads(line)["video"] for line in lines] == [0, 1, 2]
    journal.write_bytes(b"garbage\n" + journal.read_bytes())
    with pytest.raises(StoreError, match="line 1 is not JSON"):
        read_journal(journal)


def test_recreating_an_hdf5_store_drops_the_old_shard_records(tmp_path):
    path = tmp_path / "s.h5"
    _new_store(path).close()
    with ShardWriter(path, 0, 1) as w:
        w.write_video(0, *_video(0))
    create_store(
        path, video_ids=["x"], labels=[0], splits=[0], class_names=["a"], clips_per_video=C, num_frames=T,
        num_tokens=L, dim=D, attrs={}, overwrite=True,
    ).close()  # fmt: skip
    assert not shards_dir(path).exists()
    with open_store(path, "a") as s:  # nothing of the old store is merged into the new one
        assert s.videos().status.tolist() == [PENDING]


# --- real extraction ------------------------------------------------------------------------


@pytest.mark.slow
def test_job_array_shards_running_at_once_give_the_single_process_store(small_toy, small_store, tmp_path):
    out = tmp_path / "array.zarr"
    procs = [subprocess.Popen([*_extract_cmd(small_toy, out), "--shard", f"{i}/3"], env=ENV) for i in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    # the last shard to finish merged them all: the store is complete without any further step
    _assert_same_content(small_store, out)
    report = shard_report(out)
    assert report.complete and report.unmerged_videos == 0
    with open_store(out) as s, open_store(small_store) as ref:
        assert s.attrs["content"] == ref.attrs["content"]
        assert "shard" not in s.attrs["extract_config"]  # whoever created it, the attrs do not say
    assert CliRunner().invoke(app, ["merge-shards", str(out)]).exit_code == 0


@pytest.mark.slow
def test_a_missing_shard_is_named_and_running_it_later_completes_the_store(small_toy, small_store, tmp_path):
    out = tmp_path / "late.h5"
    loud = [a for a in _extract_cmd(small_toy, out) if a != "-q"]
    first = subprocess.run([*loud, "--shard", "0/2"], env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "1 of 2 shards finished" in _flat(first.stderr) and "spool merge-shards" in _flat(first.stderr)
    check = CliRunner().invoke(app, ["merge-shards", str(out)])
    assert check.exit_code == 1 and "6 videos pending (by shard 1: 6)" in _flat(check.output)
    second = subprocess.run([*_extract_cmd(small_toy, out), "--shard", "1/2"], env=ENV, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert CliRunner().invoke(app, ["merge-shards", str(out)]).exit_code == 0
    _assert_same_content(small_store, out)


@pytest.mark.slow
def test_a_killed_shard_resumes(small_toy, small_store, tmp_path):
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen([*_extract_cmd(small_toy, out), "--shard", "1/2"], env=ENV)
    journal = shards_dir(out) / "shard-00001-of-00002.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if journal.exists() and journal.stat().st_size > 0:  # one video committed, others in flight
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the shard finished before the kill; the test proves nothing"
    for i in (0, 1):
        subprocess.run([*_extract_cmd(small_toy, out), "--shard", f"{i}/2"], env=ENV, check=True, timeout=300)
    _assert_same_content(small_store, out)


def test_shard_option_errors(small_toy, small_store, tmp_path, monkeypatch):
    runner = CliRunner()
    bad = runner.invoke(app, ["extract", str(small_toy), "--out", str(tmp_path / "x.zarr"), "--shard", "2/2"])
    assert bad.exit_code == 2 and "0 <= i < n" in _flat(bad.output)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    over = runner.invoke(app, ["extract", str(small_toy), "--out", str(copy), "--shard", "0/2", "--overwrite",
                               "--weights", "random", "--size", "28", "--frames", "4", "--workers", "0", "-q"])
    assert over.exit_code == 2 and "a late shard would wipe" in _flat(over.output)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    both = runner.invoke(app, ["extract", str(small_toy), "--out", str(copy), "--shard", "0/2"])
    assert both.exit_code == 2 and "under torchrun leave --shard out" in _flat(both.output)


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_store(small_toy, small_store, tmp_path):
    out = tmp_path / "torchrun.zarr"
    loud = [a for a in _extract_cmd(small_toy, out)[3:] if a != "-q"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "spool", *loud, "--device", "cpu"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all 2 shards finished and merged" in _flat(done.stderr)
    _assert_same_content(small_store, out)
    assert sorted(p.name for p in shards_dir(out).iterdir() if not p.name.endswith(".lock")) == [
        "shard-00000-of-00002.done", "shard-00001-of-00002.done",
    ]


def test_unmerged_records_are_shown_by_info_and_refused_by_training(tmp_path):
    from spool.train import TrainConfig, TrainError, load_features

    path = tmp_path / "s.zarr"
    _new_store(path).close()
    with ShardWriter(path, 0, 2) as w:
        w.write_video(0, *_video(0))
        w.write_video(2, *_video(2))
    said = _flat(CliRunner().invoke(app, ["info", str(path)]).output)
    assert "2 videos finished by shards are not merged yet" in said and "spool merge-shards" in said
    with pytest.raises(TrainError, match="2 videos in shard records not yet merged.*spool merge-shards"):
        load_features(TrainConfig(store=str(path), out=str(tmp_path / "run")))
    merge_shards(path)
    with open_store(path) as s:
        assert (s.videos().status == DONE).sum() == 2
    assert "not merged" not in CliRunner().invoke(app, ["info", str(path)]).output


def test_rank_zero_waits_until_every_shard_has_finished(tmp_path):
    import threading

    from spool.stores.shards import wait_for_shards

    path = tmp_path / "s.zarr"
    _new_store(path).close()
    with ShardWriter(path, 0, 2) as w:
        w.write_video(0, *_video(0))
        w.finish()
    late = ShardWriter(path, 1, 2)
    late.write_video(1, *_video(1))
    waits: list[list[int]] = []

    def finish_later() -> None:
        time.sleep(0.3)
        late.finish()
        late.close()

    thread = threading.Thread(target=finish_later)
    thread.start()
    wait_for_shards(path, 2, poll=0.05, on_wait=waits.append)
    thread.join()
    assert waits and all(w == [1] for w in waits)  # it waited, for shard 1 only
    merge_shards(path)
    wait_for_shards(path, 2, poll=0.05, on_wait=lambda u: pytest.fail(f"waited for {u} after the merge"))


def test_a_finishing_shard_skips_the_merge_only_while_others_hold_the_store(tmp_path):
    from spool.extract import _merge_if_alone

    path = tmp_path / "s.zarr"
    _new_store(path).close()
    with ShardWriter(path, 0, 2) as w:
        w.write_video(0, *_video(0))
        w.finish()
        _merge_if_alone(path)  # shard 0 still holds the store: no merge, no error
        assert shard_report(path).unmerged_videos == 1
    _merge_if_alone(path)
    assert shard_report(path).unmerged_videos == 0
    with ShardWriter(path, 1, 2) as w:
        w.write_video(1, *_video(1))
    (shards_dir(path) / "shard-00001-of-00002.jsonl").write_bytes(b"not json\n")
    with pytest.raises(StoreError, match="not JSON"):  # damage is reported, not taken for a busy store
        _merge_if_alone(path)


@pytest.mark.slow
def test_torchrun_on_two_nodes_gives_the_single_process_store(small_toy, small_store, tmp_path):
    # Two torchrun agents with a static rendezvous on this machine stand in for two nodes.
    out, port = tmp_path / "nodes.h5", str(_free_port())
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port, "-m", "spool",
             *_extract_cmd(small_toy, out)[3:], "--workers", "0"],  # --device auto: each rank's own
            env=ENV, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    _assert_same_content(small_store, out)
    assert shard_report(out).finished == [0, 1, 2, 3]
    with open_store(out) as s:  # the option as given, not the device of the rank that created the store
        assert s.attrs["extract_config"]["device"] == "auto"


def test_a_shard_redoing_a_failed_video_replaces_it_on_merge(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with _new_store(path) as s:
        s.mark_failed(2, "decoder crashed")
        s.write_video(4, *_video(4))
    with ShardWriter(path, 0, 2) as w:  # what --retry-failed does for video 2
        w.write_video(2, *_video(2))
        w.finish()
    merge_shards(path)
    with open_store(path) as s:
        v = s.videos()
        assert v.status[2] == DONE and v.error[2] == "" and v.status[4] == DONE
        patches, _, frame_indices, num_frames, fps = _video(2)
        np.testing.assert_array_equal(s.read_patches([4, 5]), patches)
        np.testing.assert_array_equal(s.clips().frame_indices[4:6], frame_indices)
        assert (v.num_frames[2], v.fps[2]) == (num_frames, fps)


def test_merge_shards_on_a_store_without_shards_says_there_is_nothing_to_merge(tmp_path):
    path = tmp_path / "plain.zarr"
    _new_store(path).close()
    result = CliRunner().invoke(app, ["merge-shards", str(path)])
    said = _flat(result.output)
    assert result.exit_code == 0, said
    assert "nothing to merge; it holds no shard records" in said and "7 videos are pending" in said
    assert "all 0 shards" not in said
    as_json = json.loads(CliRunner().invoke(app, ["merge-shards", str(path), "--json"]).output)
    assert as_json["nothing_to_merge"] is True and as_json["count"] == 0
