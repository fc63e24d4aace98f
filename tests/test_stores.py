"""Feature stores: both backends run the same tests, and are compared with each other."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from spool.stores import (
    DONE,
    FAILED,
    PENDING,
    SCHEMA_VERSION,
    StoreError,
    create_store,
    open_store,
)
from spool.stores.summary import summarize

BACKENDS = [".zarr", ".h5"]
C, T, L, D = 2, 4, 16, 32  # clips_per_video, frames, tokens, dim: small but real shapes
CLASSES = ["bowling", "diving", "écriture"]


def video_ids(m: int) -> list[str]:
    # relative paths with spaces and non-ASCII, as real datasets have
    return [f"class {i % 3}/vidéo_{i:03d}.mp4" for i in range(m)]


def video_data(v: int, t: int = T, l: int = L, d: int = D):
    """Deterministic features for video v: what a backbone would give for it."""
    rng = np.random.default_rng(1000 + v)
    patches = rng.standard_normal((C, t, l, d)).astype(np.float16)
    cls = rng.standard_normal((C, t, d)).astype(np.float16)
    frames = np.sort(rng.integers(0, 300, size=(C, t)), axis=1)
    return patches, cls, frames, 300 + v, 25.0 + v / 10


def new_store(path: Path, m: int = 6, **kw):
    labels = [i % len(CLASSES) for i in range(m)]
    splits = [i % 4 - 1 for i in range(m)]  # -1, 0, 1, 2: every code, "none" included
    args = dict(
        video_ids=video_ids(m), labels=labels, splits=splits, class_names=CLASSES, clips_per_video=C,
        num_frames=T, num_tokens=L, dim=D, attrs={"backbone": "dinov2_vits14", "command": "spool extract v/"},
    )
    args.update(kw)
    return create_store(path, **args)


def write(store, v: int) -> None:
    if v % 5 == 3:
        store.mark_failed(v, f"cannot decode vidéo {v}", num_frames=0, fps=0.0)
    else:
        store.write_video(v, *video_data(v))


def content(store) -> dict[str, np.ndarray]:
    """Everything a store holds, as arrays, for equality checks."""
    vt, ct = store.videos(), store.clips()
    out = {f"video.{k}": np.asarray(getattr(vt, k)) for k in vt.__dataclass_fields__}
    out |= {f"clip.{k}": np.asarray(getattr(ct, k)) for k in ct.__dataclass_fields__}
    every = np.arange(store.num_clips)
    out["patches"] = store.read_patches(every)
    out["cls"] = store.read_cls(every)
    return out


def assert_same_content(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def set_attr(path: Path, key: str, value) -> None:
    if path.suffix == ".zarr":
        doc = json.loads((path / "zarr.json").read_text())
        doc["attributes"][key] = value
        (path / "zarr.json").write_text(json.dumps(doc))
    else:
        with h5py.File(path, "r+") as f:
            f.attrs[key] = json.dumps(value)


def delete_array(path: Path, name: str) -> None:
    if path.suffix == ".zarr":
        shutil.rmtree(path / name)
    else:
        with h5py.File(path, "r+") as f:
            del f[name]


@pytest.fixture(params=BACKENDS)
def suffix(request) -> str:
    return request.param


def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"feats{suffix}"
    with new_store(path) as s:
        assert s.pending_videos().tolist() == list(range(6))
        for v in range(6):
            write(s, v)
    with open_store(path) as s:
        assert (s.num_videos, s.num_clips, s.clips_per_video) == (6, 12, C)
        assert (s.num_frames, s.num_tokens, s.dim, s.class_names) == (T, L, D, CLASSES)
        vt = s.videos()
        assert vt.video_id.tolist() == video_ids(6)
        assert vt.status.tolist() == [DONE, DONE, DONE, FAILED, DONE, DONE]
        assert vt.error[3] == "cannot decode vidéo 3" and vt.error[0] == ""
        ct = s.clips()
        assert ct.video_index.tolist() == [v for v in range(6) for _ in range(C)]
        assert ct.view_index.tolist() == [0, 1] * 6
        assert ct.done.tolist() == [v != 3 for v in range(6) for _ in range(C)]
        for v in (0, 4, 5):
            patches, cls, frames, nf, fps = video_data(v)
            clip_slots = [v * C + 1, v * C]  # reversed: results come back in the order asked
            np.testing.assert_array_equal(s.read_patches(clip_slots), patches[::-1])
            np.testing.assert_array_equal(s.read_cls(clip_slots), cls[::-1])
            np.testing.assert_array_equal(ct.frame_indices[v * C : v * C + C], frames)
            assert vt.num_frames[v] == nf and vt.fps[v] == fps
        assert s.read_patches([]).shape == (0, T, L, D)
        with pytest.raises(IndexError, match="out of range"):
            s.read_patches([12])
        with pytest.raises(StoreError, match="read-only"):
            s.write_video(0, *video_data(0))


def test_slots_independent_of_write_order(tmp_path, suffix):
    stores = []
    for name, order in [("fwd", range(6)), ("rev", [4, 1, 5, 0, 3, 2])]:
        with new_store(tmp_path / f"{name}{suffix}") as s:
            for v in order:
                write(s, v)
        stores.append(open_store(tmp_path / f"{name}{suffix}"))
    assert_same_content(content(stores[0]), content(stores[1]))


def test_backends_hold_identical_content(tmp_path):
    opened = []
    for suffix in BACKENDS:
        with new_store(tmp_path / f"s{suffix}") as s:
            for v in [2, 0, 3, 5]:
                write(s, v)
            s.mark_failed(1, "x" * 2000)  # long reasons are truncated the same way
        opened.append(open_store(tmp_path / f"s{suffix}"))
    zs, hs = opened
    assert_same_content(content(zs), content(hs))
    assert zs.attrs["fingerprint"] == hs.attrs["fingerprint"]


def test_rewrite_replaces_a_failed_or_done_video(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with new_store(path) as s:
        s.mark_failed(0, "transient")
        s.write_video(0, *video_data(0))
        s.write_video(1, *video_data(7))
        s.mark_failed(1, "gone")
    with open_store(path) as s:
        vt = s.videos()
        assert vt.status[:2].tolist() == [DONE, FAILED] and vt.error[:2].tolist() == ["", "gone"]
        np.testing.assert_array_equal(s.read_patches([0, 1]), video_data(0)[0])
        assert not s.read_patches([2, 3]).any() and (s.clips().frame_indices[2:4] == -1).all()


def test_plain_library_reads_match(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with new_store(path) as s:
        write(s, 1)
    with open_store(path) as s:
        ours = s.read_patches([2, 3])
    if suffix == ".zarr":
        theirs = zarr.open_group(path, mode="r")["patches"][2:4]
    else:
        with h5py.File(path, "r") as f:
            theirs = f["patches"][2:4]
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, video_data(1)[0])


def test_read_into_buffer_and_library_fallback(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with new_store(path) as s:
        for v in (0, 2):
            write(s, v)
    order = np.array([4, 0, 5, 1, 2])  # clip 2 is PENDING: reads as zeros
    with open_store(path) as s:
        fast = s.read_patches(order)
        buf = np.full((5, T, L, D), np.nan, dtype=np.float16)
        assert s.read_patches(order, out=buf) is buf
        np.testing.assert_array_equal(buf, fast)
        assert not fast[4].any()
        with pytest.raises(ValueError, match="out must be"):
            s.read_cls(order, out=np.empty((5, T, D), np.float32))
        # The path for stores the raw-bytes reader does not recognise (compressed, chunked).
        if suffix == ".zarr":
            s._raw = {"patches": False, "cls": False}
        else:
            s._mm = {}
        np.testing.assert_array_equal(s.read_patches(order), fast)
        cls = s.read_cls(order)
        np.testing.assert_array_equal(cls[:2], [video_data(2)[1][0], video_data(0)[1][0]])  # clips 4 and 0


def test_reopen_for_append(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with new_store(path) as s:
        write(s, 0)
    with open_store(path, "a") as s:
        assert s.pending_videos().tolist() == [1, 2, 3, 4, 5]
        write(s, 4)
    with open_store(path) as s:
        assert s.videos().status.tolist() == [DONE, PENDING, PENDING, PENDING, DONE, PENDING]


def test_lock_refuses_second_writer(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with new_store(path) as s:
        with pytest.raises(StoreError, match=rf"PID {os.getpid()}.*spool extract"):
            open_store(path, "a")
        with open_store(path) as reader:  # readers take no lock
            assert reader.num_videos == 6
        write(s, 0)
    with open_store(path, "a") as s:  # released on close
        write(s, 1)


def test_lock_from_another_process(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    new_store(path).close()
    code = f"from spool.stores import open_store; s = open_store({str(path)!r}, 'a'); print('held', flush=True); input()"
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "held"
            with pytest.raises(StoreError, match=f"PID {proc.pid}"):
                open_store(path, "a")
        finally:
            proc.kill()
            proc.wait()
    open_store(path, "a").close()  # the kernel dropped the dead writer's lock


def test_newer_schema_refused(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    new_store(path).close()
    set_attr(path, "schema_version", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match=rf"newer Spool, schema v{SCHEMA_VERSION + 1} > v{SCHEMA_VERSION}; upgrade spool"):
        open_store(path)


@pytest.mark.parametrize("name", ["fps", "patches"])
def test_missing_array_refused(tmp_path, suffix, name):
    path = tmp_path / f"s{suffix}"
    new_store(path).close()
    delete_array(path, name)
    with pytest.raises(StoreError, match=rf"{name}.*missing") as e:
        open_store(path)
    assert str(path) in str(e.value)


def test_create_refuses_existing_and_overwrite_only_replaces_stores(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with new_store(path) as s:
        write(s, 0)
    with pytest.raises(StoreError, match="already exists.*overwrite=True"):
        new_store(path)
    with new_store(path, m=3, overwrite=True) as s:
        assert s.num_videos == 3 and s.pending_videos().tolist() == [0, 1, 2]

    other = tmp_path / f"precious{suffix}"
    if suffix == ".zarr":
        other.mkdir()
        (other / "thesis.tex").write_text("do not delete")
    else:
        other.write_text("do not delete")
    with pytest.raises(StoreError, match="not a Spool feature store"):
        new_store(other, overwrite=True)
    assert other.exists()
    assert not list(tmp_path.glob(".*creating*"))


def test_overwrite_refused_while_written(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with new_store(path):
        with pytest.raises(StoreError, match="locked for writing"):
            new_store(path, overwrite=True)


def test_bad_inputs(tmp_path):
    with pytest.raises(StoreError, match=r"\.zarr, \.h5, \.hdf5"):
        new_store(tmp_path / "s.npz")
    with pytest.raises(StoreError, match="unique"):
        new_store(tmp_path / "a.zarr", video_ids=["a", "a", "b", "c", "d", "e"])
    with pytest.raises(StoreError, match="labels must lie in"):
        new_store(tmp_path / "b.zarr", labels=[0, 1, 2, 3, 0, 0])
    with pytest.raises(StoreError, match="or be -1 for unlabeled"):
        new_store(tmp_path / "b2.zarr", labels=[0, 1, -2, 0, 0, 0])
    with new_store(tmp_path / "b3.zarr", labels=[0, 1, -1, 0, 0, 0]) as unlabeled:  # -1: no label given
        assert unlabeled.videos().label.tolist() == [0, 1, -1, 0, 0, 0]
    with pytest.raises(StoreError, match="set by create_store"):
        new_store(tmp_path / "c.zarr", attrs={"dim": 3})
    with new_store(tmp_path / "d.zarr") as s:
        with pytest.raises(StoreError, match=r"patches has shape .*expects \(2, 4, 16, 32\)"):
            s.write_video(0, np.zeros((C, T, L, D + 1)), *video_data(0)[1:])
    assert not (tmp_path / "a.zarr").exists()


def test_fingerprint_tracks_content_not_provenance(tmp_path):
    fp = lambda name, **kw: new_store(tmp_path / name, **kw).attrs["fingerprint"]  # noqa: E731
    base = fp("a.zarr")
    assert fp("b.h5", attrs={"backbone": "dinov2_vits14", "command": "other command"}) == base
    assert fp("c.zarr", labels=[1, 1, 2, 0, 1, 2]) != base
    assert fp("d.zarr", attrs={"backbone": "dinov2_vitb14"}) != base


def test_summary(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with new_store(path) as s:
        for v in range(5):
            write(s, v)
    with open_store(path) as s:
        info = summarize(s)
    assert info["status"] == {"pending": 1, "done": 4, "failed": 1}
    assert info["done_clips"] == 4 * C
    # DONE videos 0, 1, 2, 4: splits -1, 0, 1, -1 and labels 0, 1, 2, 1
    assert info["done_videos_per_split"] == {"train": 1, "val": 1, "test": 0, "none": 2}
    assert info["done_videos_per_class"] == {"bowling": 1, "diving": 2, "écriture": 1}
    assert info["failures"] == [{"video_id": video_ids(6)[3], "reason": "cannot decode vidéo 3"}]
    assert info["bytes_on_disk"] >= 4 * C * T * L * D * 2
    json.dumps(info)


def test_zarr_partial_files_removed_by_next_writer(tmp_path):
    path = tmp_path / "s.zarr"
    new_store(path).close()
    junk = path / "patches" / "c" / "0" / "0" / "0" / "0.1234.partial"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"torn")
    open_store(path).close()
    assert junk.exists()  # readers change nothing
    open_store(path, "a").close()
    assert not junk.exists()


# --- crash safety ---------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import random, sys
    sys.path.insert(0, {tests!r})
    from test_stores import write
    from spool.stores import open_store
    store = open_store({path!r}, "a")
    store.commit_interval = 0  # commit every video, so that kills land in commits too
    todo = store.pending_videos().tolist()
    random.Random({seed}).shuffle(todo)
    print("ready", flush=True)
    for v in todo:
        write(store, v)
        print(v, flush=True)
    store.close()
    print("finished", flush=True)
    """
)


def run_writer(path: Path, seed: int, kill: tuple[int, float] | None) -> bool:
    """Run a writer process on ``path``. With ``kill=(k, delay)``, SIGKILL it ``delay`` seconds
    after it reports its k-th video, which lands the kill at a random point of a later write
    whatever the machine's speed. Returns whether it was killed before finishing."""
    code = WRITER.format(tests=str(Path(__file__).parent), path=str(path), seed=seed)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().strip() == "ready"
        if kill is None:
            assert proc.wait(timeout=60) == 0
            return False
        k, delay = kill
        for _ in range(k):
            proc.stdout.readline()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.returncode == -signal.SIGKILL and "finished" not in proc.stdout.read()


def test_sigkill_leaves_a_consistent_resumable_store(tmp_path, suffix):
    m = 40
    path = tmp_path / f"killed{suffix}"
    new_store(path, m=m).close()
    rng = random.Random(7)
    kills = 0
    for round_ in range(4):
        kills += run_writer(path, seed=round_, kill=(rng.randint(1, 5), rng.uniform(0.0, 0.004)))
        with open_store(path) as s:  # opens, and whatever says DONE is complete
            vt = s.videos()
            for v in np.flatnonzero(vt.status == DONE):
                patches, cls, frames, nf, fps = video_data(int(v))
                np.testing.assert_array_equal(s.read_patches([v * C, v * C + 1]), patches)
                np.testing.assert_array_equal(s.read_cls([v * C, v * C + 1]), cls)
                np.testing.assert_array_equal(s.clips().frame_indices[v * C : v * C + C], frames)
                assert (vt.num_frames[v], vt.fps[v]) == (nf, fps)
            for v in np.flatnonzero(vt.status == FAILED):
                assert vt.error[v] == f"cannot decode vidéo {v}"
    assert kills >= 3, "the writer finished before most kills; the test no longer exercises crashes"
    run_writer(path, seed=99, kill=None)

    reference = tmp_path / f"reference{suffix}"
    with new_store(reference, m=m) as s:
        for v in range(m):
            write(s, v)
    with open_store(path) as a, open_store(reference) as b:
        assert a.pending_videos().size == 0
        assert_same_content(content(a), content(b))


# --- durability (power loss) ------------------------------------------------------------------


def record_syscalls(monkeypatch, root: Path) -> list[tuple[str, str]]:
    """Every fsync, rename and unlink under ``root`` in the order the process makes them, from
    any thread: ("fsync", path), ("rename", destination), ("unlink", path). HDF5 writes its
    bytes in C, so for it the status writes are recorded at the store's method instead."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename, real_unlink = os.fsync, os.replace, os.rename, os.unlink

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)  # recorded once it returned: the data is on the disk from here on
        events.append(("fsync", path))

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        events.append(("rename", str(dst)))

    def rename(src, dst, *a, **kw):
        real_rename(src, dst, *a, **kw)
        events.append(("rename", str(dst)))

    def unlink(path, *a, **kw):
        real_unlink(path, *a, **kw)
        events.append(("unlink", str(path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)
    return events


def assert_synced_before_each_status_write(events, root: Path, is_status) -> int:
    """Each status write comes after an fsync of every data file written before it, and of the
    directories between that file and ``root``, made after that write. Returns how many
    status writes were checked."""
    unsynced: dict[str, int] = {}  # path -> position of its last unsynced change
    checked = 0
    for n, (kind, path) in enumerate(events):
        if kind in ("rename", "unlink") and not is_status(path):
            p = Path(path)
            unsynced[path] = n
            for d in [d for d in p.parents if root in d.parents or d == root]:
                unsynced[str(d)] = n
        elif kind == "fsync":
            unsynced.pop(path, None)
        elif is_status(path):
            assert not unsynced, f"status write {path} (event {n}) precedes the sync of {sorted(unsynced)[:5]}"
            checked += 1
    return checked


def test_zarr_status_is_written_only_after_its_chunks_and_their_directories_are_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "durable.zarr"
    store = new_store(path, m=12)
    events = record_syscalls(monkeypatch, path)
    for v in range(8):
        write(store, v)  # one failed video among them (v % 5 == 3): zarr deletes its zero chunks
        if v == 4:
            store.commit()  # two commits, of videos 0-4 and of 5-7
    write(store, 0)  # a rewrite: its PENDING must be durable before the new data goes in
    store.close()  # commits the rest
    renames = [p for k, p in events if k == "rename"]
    assert any("/patches/c/" in p for p in renames) and any("/status/c/" in p for p in renames)
    assert assert_synced_before_each_status_write(events, path, lambda p: "/status/c/" in p and not p.endswith(".partial")) >= 3
    # the statuses themselves are durable when close returns
    last_status = max(i for i, (k, p) in enumerate(events) if k == "rename" and "/status/c/" in p)
    assert ("fsync", str(path / "status" / "c" / "0")) in events[last_status:]
    assert ("fsync", str(path / "status" / "c")) in events[last_status:]
    with open_store(path) as s:
        assert list(s.videos().status[:9]) == [DONE, DONE, DONE, FAILED, DONE, DONE, DONE, DONE, PENDING]


def test_hdf5_status_bytes_are_written_only_after_an_fsync_of_the_features(tmp_path, monkeypatch):
    from spool.stores.hdf5_store import HDF5FeatureStore

    path = tmp_path / "durable.h5"
    store = new_store(path, m=12)
    events = record_syscalls(monkeypatch, path)
    real_slots, real_status = HDF5FeatureStore._write_slots, HDF5FeatureStore._write_status

    def slots(self, v, *a):
        real_slots(self, v, *a)
        events.append(("data", str(path)))

    def status(self, idx, st):
        events.append(("status", f"{idx.tolist()}={st.tolist()}"))
        real_status(self, idx, st)

    monkeypatch.setattr(HDF5FeatureStore, "_write_slots", slots)
    monkeypatch.setattr(HDF5FeatureStore, "_write_status", status)
    for v in range(8):
        write(store, v)
        if v == 4:
            store.commit()
    write(store, 1)  # rewrite: what is staged is committed, then PENDING, fsync, then the new data
    store.close()
    dirty, commits = False, []
    for kind, what in events:
        if kind == "data":
            dirty = True
        elif kind == "fsync" and what == str(path):
            dirty = False
        elif kind == "status":
            assert not dirty, f"status write {what} precedes the fsync of the features written before it"
            commits.append(what)
    assert commits == ["[0, 1, 2, 3, 4]=[1, 1, 1, 2, 1]", "[5, 6, 7]=[1, 1, 1]", "[1]=[0]", "[1]=[1]"]
    assert events[-1] == ("fsync", str(path))  # the last commit is on the disk when close returns


def test_shard_journal_lines_follow_the_sync_of_their_clips(tmp_path, monkeypatch, suffix):
    from spool.stores.shards import ShardWriter, shards_dir

    path = tmp_path / f"sharded{suffix}"
    new_store(path, m=8).close()
    events = record_syscalls(monkeypatch, path)
    journal = shards_dir(path) / "shard-00000-of-00002.jsonl"
    real_write = None

    with ShardWriter(path, 0, 2) as shard:
        real_write = shard._journal.write

        def journal_write(data):
            events.append(("journal", data.decode().count("\n")))
            return real_write(data)

        shard._journal = SimpleJournal(shard._journal, journal_write)
        for v in (0, 2, 4):
            patches, cls, frames, nf, fps = video_data(v)
            shard.write_video(v, patches, cls, frames, nf, fps)
        shard.mark_failed(6, "broken")
        shard.finish()
    lines = [e for e in events if e[0] == "journal"]
    assert sum(n for _, n in lines) == 5  # 4 videos and the finish marker
    first = events.index(lines[0])
    synced = {p for k, p in events[:first] if k == "fsync"}
    if suffix == ".zarr":
        for v in (0, 2, 4):
            for c in range(C):
                chunk = path / "patches" / "c" / str(v * C + c) / "0" / "0" / "0"
                assert str(chunk) in synced and str(chunk.parent) in synced
        assert str(path / "patches" / "c") in synced
    else:
        assert str(path) in synced
    assert ("fsync", str(journal)) in events[first:]


class SimpleJournal:
    """A journal file whose writes go through ``write`` (to record them)."""

    def __init__(self, f, write):
        self._f, self.write = f, write

    def __getattr__(self, name):
        return getattr(self._f, name)
