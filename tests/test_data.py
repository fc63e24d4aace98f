from __future__ import annotations

import numpy as np
import pytest
import torch

import spool.data as data
from spool.data import FeatureSet, FeatureSetError, assign_splits, pool_tokens, pooled_num_tokens
from spool.stores import NO_SPLIT, SPLIT_CODES, create_store, open_store


def make_store(
    path,
    *,
    num_videos=12,
    num_classes=3,
    clips_per_video=2,
    T=4,
    L=4,
    D=8,
    splits=None,
    done=None,
    seed=0,
    signal=1.0,
    order_signal=0.0,
):
    """A real store with synthetic features: video v has class v % num_classes; its patches
    are noise plus ``signal`` times a per-class direction (so heads can learn), plus
    ``order_signal`` times a ramp over time whose sign flips with the class parity (only a
    head that sees frame order can use it). ``done``: which videos to write (default all)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_videos) % num_classes
    splits = np.full(num_videos, NO_SPLIT) if splits is None else np.asarray(splits)
    store = create_store(
        path,
        video_ids=[f"v{i:03d}.mp4" for i in range(num_videos)],
        labels=labels,
        splits=splits,
        class_names=[f"class{c}" for c in range(num_classes)],
        clips_per_video=clips_per_video,
        num_frames=T,
        num_tokens=L,
        dim=D,
        attrs={"backbone": "synthetic", "seed": seed},
    )
    directions = rng.standard_normal((num_classes, D))
    ramp = np.linspace(-1, 1, T)[:, None, None]
    for v in range(num_videos):
        if done is not None and v not in done:
            continue
        c = labels[v]
        patches = rng.standard_normal((clips_per_video, T, L, D)) + signal * directions[c]
        patches += order_signal * (1 if c % 2 else -1) * ramp
        cls = patches.mean(axis=2)
        frames = np.tile(np.arange(T), (clips_per_video, 1))
        store.write_video(v, patches.astype(np.float16), cls.astype(np.float16), frames, num_frames=T, fps=25.0)
    store.close()
    return open_store(path)


# --- splits -----------------------------------------------------------------------------


def test_store_split_is_used_when_present(tmp_path):
    codes = [SPLIT_CODES["train"]] * 6 + [SPLIT_CODES["val"]] * 3 + [SPLIT_CODES["test"]] * 3
    store = make_store(tmp_path / "s.zarr", num_videos=12, splits=codes)
    t = store.clips()
    s = assign_splits(t.split, t.video_index, t.label, t.done, val_fraction=0.5, seed=3)
    assert s.source == "store" and s.eval_split == "val"
    assert set(t.video_index[s.train]) == set(range(6))
    assert set(t.video_index[s.val]) == {6, 7, 8}
    assert set(t.video_index[s.test]) == {9, 10, 11}
    np.testing.assert_array_equal(s.eval, s.val)


def test_store_split_without_val_evaluates_on_test():
    split = np.array([0, 0, 0, 0, 2, 2], np.int8)
    s = assign_splits(split, np.arange(6), np.arange(6) % 2, np.ones(6, bool))
    assert s.eval_split == "test" and len(s.val) == 0
    np.testing.assert_array_equal(s.eval, [4, 5])


def test_drawn_split_groups_videos_stratifies_and_is_deterministic():
    num_videos, clips_per_video, num_classes = 40, 3, 4
    video = np.repeat(np.arange(num_videos), clips_per_video)
    label = video % num_classes
    split = np.full(len(video), NO_SPLIT, np.int8)
    done = video != 7  # video 7 not finished: its clips are never used
    label = np.where(video == 9, -1, label)  # video 9 unlabeled: never used either
    s = assign_splits(split, video, label, done, val_fraction=0.25, seed=0)
    assert s.source == "drawn" and s.eval_split == "val" and len(s.test) == 0
    train_v, val_v = set(video[s.train]), set(video[s.val])
    assert not train_v & val_v, "a video landed in two splits"
    assert train_v | val_v == set(range(num_videos)) - {7, 9}
    # whole videos: every clip of a val video is in val
    assert len(s.val) == clips_per_video * len(val_v)
    # stratified: about a quarter of the videos of every class are in val
    per_class = np.bincount(label[s.val], minlength=num_classes) // clips_per_video
    assert per_class.min() >= 1 and per_class.max() <= 4
    again = assign_splits(split, video, label, done, val_fraction=0.25, seed=0)
    np.testing.assert_array_equal(again.val, s.val)
    other = [assign_splits(split, video, label, done, val_fraction=0.25, seed=k).val for k in range(1, 4)]
    assert any(not np.array_equal(o, s.val) for o in other), "the seed does not change the split"


def test_drawn_split_needs_enough_videos():
    with pytest.raises(FeatureSetError, match="at least 5 finished videos"):
        assign_splits(np.full(3, -1), np.arange(3), np.zeros(3), np.ones(3, bool), val_fraction=0.2)
    with pytest.raises(FeatureSetError, match="no finished"):
        assign_splits(np.full(3, -1), np.arange(3), np.zeros(3), np.zeros(3, bool))
    with pytest.raises(FeatureSetError, match="label -1"):
        assign_splits(np.full(3, -1), np.arange(3), np.full(3, -1), np.ones(3, bool))


def test_a_train_split_of_one_class_is_refused_naming_the_classes():
    video = np.arange(12)
    split = np.full(12, NO_SPLIT, np.int8)
    with pytest.raises(FeatureSetError, match=r"one class only \(walk\).*per class in the store: walk: 12"):
        assign_splits(split, video, np.zeros(12), np.ones(12, bool), class_names=["walk"])
    # the store's own split: train holds class 0 only, val holds class 1
    codes = np.array([SPLIT_CODES["train"]] * 6 + [SPLIT_CODES["val"]] * 6, np.int8)
    with pytest.raises(FeatureSetError, match=r"one class only \(run\).*run: 6, jump: 6"):
        assign_splits(codes, video, (video >= 6).astype(int), np.ones(12, bool), class_names=["run", "jump"])
    assign_splits(split, video, video % 2, np.ones(12, bool), val_fraction=0.5)  # two classes train
    # the store holds a second class, but none of its videos finished: the message names it
    with pytest.raises(FeatureSetError, match=r"one class only \(walk\).*per class in the store: walk: 6, run: 0"):
        assign_splits(split, video, video % 2, video % 2 == 0, class_names=["walk", "run"])


def test_too_few_videos_per_class_says_what_to_pass_instead():
    video = np.arange(7)
    label = np.array([0, 0, 0, 0, 1, 1, 1])  # 4 and 3 videos: a 1-in-5 split needs 5 of some class
    split = np.full(7, NO_SPLIT, np.int8)
    with pytest.raises(FeatureSetError) as err:
        assign_splits(split, video, label, np.ones(7, bool), val_fraction=0.2, class_names=["a", "b"])
    message = str(err.value)
    assert "at least 5 finished videos; videos per class: a: 4, b: 3" in message
    assert "--split-file" in message and "--val-fraction 0.25 or more" in message
    s = assign_splits(split, video, label, np.ones(7, bool), val_fraction=0.25, class_names=["a", "b"])
    assert set(label[s.val]) == {0, 1}


def test_fewer_videos_than_the_split_draws_says_the_counts_and_what_to_pass():
    # 2 + 2 videos: too few for a 1-in-5 split at all (was: "needs at least 5 finished videos, the
    # store has 4; extract more videos or raise --val-fraction", without the classes or a way out)
    video, label = np.arange(4), np.array([0, 0, 1, 1])
    split = np.full(4, NO_SPLIT, np.int8)
    with pytest.raises(FeatureSetError) as err:
        assign_splits(split, video, label, np.ones(4, bool), val_fraction=0.2, class_names=["a", "b"])
    message = str(err.value)
    assert "need at least 5 finished videos; videos per class: a: 2, b: 2 (4 in all)" in message
    assert "--split-file" in message and "--val-fraction 0.5 or more" in message
    assign_splits(split, video, label, np.ones(4, bool), val_fraction=0.5)  # what it says to pass works
    # held out of train: a split file would not help, leaving the option out does
    video, label = np.arange(10), np.arange(10) % 2
    with pytest.raises(FeatureSetError) as err:
        assign_splits(np.full(10, NO_SPLIT, np.int8), video, label, np.ones(10, bool), val_fraction=0.5,
                      val_from_train=0.2, class_names=["a", "b"])  # fmt: skip
    message = str(err.value)
    assert "--val-from-train 0.2 holds out 1 in 5" in message and "videos per class: a:" in message
    assert "--split-file" not in message and "or leave --val-from-train out" in message


def test_all_unlabeled_says_the_source_had_no_classes():
    with pytest.raises(FeatureSetError, match=r"all 3 finished videos .* unlabeled .*SRC/<class>/<video>"):
        assign_splits(np.full(3, -1), np.arange(3), np.full(3, -1), np.ones(3, bool))


def test_val_from_train_holds_out_train_videos_stratified():
    num_videos, C = 40, 2
    video = np.repeat(np.arange(num_videos), C)
    label = video % 4
    split = np.full(len(video), NO_SPLIT, np.int8)
    plain = assign_splits(split, video, label, np.ones(len(video), bool), val_fraction=0.25, seed=1)
    s = assign_splits(split, video, label, np.ones(len(video), bool), val_fraction=0.25, seed=1, val_from_train=0.2)
    np.testing.assert_array_equal(s.val, plain.val)  # the reported split does not change
    assert set(video[s.select]).isdisjoint(video[s.train]) and set(video[s.select]).isdisjoint(video[s.val])
    assert set(video[s.select]) | set(video[s.train]) == set(video[plain.train])
    assert np.bincount(label[s.select], minlength=4).min() >= C  # every class is in the selection split
    assert s.summary()["val_from_train"] == 0.2 and s.summary()["select"] == len(s.select)
    assert len(plain.select) == 0


# --- token pooling ----------------------------------------------------------------------


def test_pool_tokens_matches_hand_computation():
    # 4x4 grid, token value = its row-major index; 2x2 pooling averages these squares:
    #  0  1 |  2  3
    #  4  5 |  6  7
    #  ------+------
    #  8  9 | 10 11
    # 12 13 | 14 15
    x = np.arange(16, dtype=np.float16).reshape(1, 16, 1)
    x = np.concatenate([x, -x], axis=-1)  # D = 2, second channel negated
    out = pool_tokens(x, 2)
    assert out.shape == (1, 4, 2) and out.dtype == np.float16
    np.testing.assert_array_equal(out[0, :, 0], [2.5, 4.5, 10.5, 12.5])
    np.testing.assert_array_equal(out[0, :, 1], [-2.5, -4.5, -10.5, -12.5])
    assert pool_tokens(x, 4)[0, 0, 0] == 7.5
    assert pool_tokens(x, 1) is x


def test_pool_tokens_rejects_bad_grids():
    assert pooled_num_tokens(256, 4) == 16
    with pytest.raises(FeatureSetError, match="not a square"):
        pooled_num_tokens(12, 2)
    with pytest.raises(FeatureSetError, match="must divide"):
        pooled_num_tokens(36, 4)


# --- feature set ------------------------------------------------------------------------


class CountingStore:
    """Wraps a store and counts reads."""

    def __init__(self, store):
        self._store, self.patch_reads, self.cls_reads = store, [], []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read_patches(self, idx, out=None):
        self.patch_reads.append(np.asarray(idx).copy())
        return self._store.read_patches(idx, out=out)

    def read_cls(self, idx, out=None):
        self.cls_reads.append(np.asarray(idx).copy())
        return self._store.read_cls(idx, out=out)


@pytest.mark.parametrize("token_pool", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_feature_set_caches_agree_and_match_store(tmp_path, token_pool, workers, suffix):
    store = make_store(tmp_path / f"s{suffix}", num_videos=6, L=16, D=4)
    clips = np.arange(store.num_clips)[::-1]  # order of the request does not matter
    sets = {
        c: FeatureSet(store, clips, token_pool=token_pool, inputs=("patches", "cls"), cache=c, workers=workers, read_batch=5)
        for c in ("none", "memory")
    }
    wanted = np.array([1, 4, 5, 9, 10])
    got = {c: list(fs.batches(wanted, 2)) for c, fs in sets.items()}
    for a, b in zip(got["none"], got["memory"]):
        for k in ("patches", "cls", "label", "clip"):
            assert (a[k] == b[k]).all()
    batch = got["memory"][0]
    np.testing.assert_array_equal(batch["clip"].numpy(), [1, 4])
    np.testing.assert_array_equal(batch["patches"].numpy(), pool_tokens(store.read_patches([1, 4]), token_pool))
    np.testing.assert_array_equal(batch["cls"].numpy(), store.read_cls([1, 4]))
    assert batch["patches"].shape == (2, 4, 16 // token_pool**2, 4)
    # batches handed out earlier are not overwritten by later reads (no shared buffers)
    again = list(sets["none"].batches(wanted, 2))
    for a, b in zip(got["none"], again):
        assert (a["patches"] == b["patches"]).all()
    np.testing.assert_array_equal(batch["label"].numpy(), store.clips().label[[1, 4]])
    assert sum(len(b["clip"]) for b in got["none"]) == len(wanted)


def test_shuffle_is_a_function_of_seed_and_epoch(tmp_path):
    store = make_store(tmp_path / "s.zarr", num_videos=10)
    fs = FeatureSet(store, np.arange(store.num_clips), inputs=("cls",), cache="memory")

    def order(**kw):
        return np.concatenate([b["clip"].numpy() for b in fs.batches(np.arange(20), 4, shuffle=True, **kw)])

    a = order(seed=1, epoch=0)
    assert sorted(a) == list(range(20))
    np.testing.assert_array_equal(a, order(seed=1, epoch=0))
    assert not np.array_equal(a, order(seed=1, epoch=1))
    assert not np.array_equal(a, order(seed=2, epoch=0))
    for b in fs.batches(np.arange(20), 4, shuffle=True, seed=1):
        assert (np.diff(b["clip"].numpy()) > 0).all(), "a batch is read in store order"


def test_cls_only_feature_set_never_reads_patches(tmp_path):
    store = CountingStore(make_store(tmp_path / "s.zarr", num_videos=6))
    for cache in ("none", "memory"):
        fs = FeatureSet(store, np.arange(12), inputs=("cls",), cache=cache, read_batch=4)
        batches = list(fs.batches(np.arange(12), 5))
        assert "patches" not in batches[0]
    assert store.patch_reads == []
    # one read per batch (none) or per read_batch chunk (memory), always sorted
    assert len(store.cls_reads) == 3 + 3
    assert all((np.diff(r) > 0).all() for r in store.cls_reads)


def test_memory_cache_refuses_what_does_not_fit(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.zarr", num_videos=6)
    monkeypatch.setattr(data, "available_memory_bytes", lambda: 1000)
    with pytest.raises(FeatureSetError, match="--cache memory: .*use --cache none"):
        FeatureSet(store, np.arange(12), cache="memory")
    fs = FeatureSet(store, np.arange(12), cache="auto")
    assert fs.cache == "none" and "half" in fs.cache_reason
    with pytest.raises(FeatureSetError, match="CUDA"):
        FeatureSet(store, np.arange(12), cache="gpu")



def test_processes_on_one_machine_share_its_ram(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.zarr", num_videos=6)  # 12 clips of 256 bytes of patches
    monkeypatch.setattr(data, "available_memory_bytes", lambda: 8 * 12 * 256)
    assert FeatureSet(store, np.arange(12), cache="auto").cache == "memory"  # needs half of it
    fs = FeatureSet(store, np.arange(12), cache="auto", processes_per_host=8)  # torchrun ranks, one copy each
    assert fs.cache == "none" and "each of 8 processes" in fs.cache_reason


def test_feature_set_rejects_unfinished_and_unloaded_clips(tmp_path):
    store = make_store(tmp_path / "s.zarr", num_videos=6, done={0, 1, 2, 3})
    with pytest.raises(FeatureSetError, match="not DONE"):
        FeatureSet(store, np.arange(12), cache="none")
    fs = FeatureSet(store, np.arange(4), inputs=("cls",), cache="memory")
    with pytest.raises(FeatureSetError, match="not loaded"):
        next(fs.batches([3, 5], 2))


def test_gpu_cache_path_agrees_with_memory(tmp_path, monkeypatch):
    # no GPU here: run the "gpu" code path (chunked copy into device tensors, index_select)
    # with CPU tensors, which is what it does on CUDA, and compare with the memory cache
    store = make_store(tmp_path / "s.zarr", num_videos=6, L=16, D=4)
    memory = FeatureSet(store, np.arange(12), token_pool=2, inputs=("patches", "cls"), cache="memory", read_batch=5)
    monkeypatch.setattr(FeatureSet, "_resolve_cache", lambda self, cache: ("gpu", "forced for the test"))
    gpu = FeatureSet(store, np.arange(12), token_pool=2, inputs=("patches", "cls"), cache="gpu", read_batch=5)
    assert all(isinstance(v, torch.Tensor) for v in gpu._arrays.values())
    for a, b in zip(gpu.batches(np.arange(12), 5, shuffle=True), memory.batches(np.arange(12), 5, shuffle=True)):
        for k in ("patches", "cls", "label", "clip"):
            assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("token_pool", [1, 2])
def test_a_lost_clip_of_a_done_video_in_hdf5_is_refused_by_the_loader_and_repaired(tmp_path, token_pool):
    """HDF5 reads a clip whose bytes never reached the disk as zeros, without an error (zarr's
    missing chunk file raises in the store itself): the loader refuses such a clip, and
    `spool verify --repair` marks its video pending, after which the rest trains."""
    import h5py

    from spool.stores import DONE, PENDING
    from spool.stores.verify import repair, verify

    path = tmp_path / "s.h5"
    make_store(path, num_videos=6, clips_per_video=2, L=16).close()
    with h5py.File(path, "r+", locking=False) as f:
        f["patches"][7] = 0  # video 3's second clip
        f["cls"][7] = 0
    with open_store(path) as store:
        for cache, inputs in (("none", ("patches",)), ("memory", ("patches",)), ("memory", ("cls",))):
            with pytest.raises(FeatureSetError, match=r"clip 7 \(video 'v003.mp4'\) read as all zeros.*verify --repair"):
                fs = FeatureSet(store, np.arange(12), cache=cache, inputs=inputs, token_pool=token_pool, workers=0)
                list(fs.batches(np.arange(12), 4))
        fine = FeatureSet(store, [0, 1, 2, 3], cache="none", token_pool=token_pool, workers=0)
        assert len(list(fine.batches([0, 1, 2, 3], 4))) == 1  # the undamaged clips read as before
    assert repair(path, verify(path)) == ["v003.mp4"]
    with open_store(path) as store:
        t = store.clips()
        assert store.videos().status[3] == PENDING and (np.delete(store.videos().status, 3) == DONE).all()
        done = np.flatnonzero(t.done)
        fs = FeatureSet(store, done, cache="memory", token_pool=token_pool)
        assert sum(len(b["label"]) for b in fs.batches(done, 4)) == 10
