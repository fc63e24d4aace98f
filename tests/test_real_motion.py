"""The Spool head reads motion in trained features of real pixels, where averaging cannot.

A small version of benchmarks/real_motion.py (docs/benchmarks.md, "Real features"): a virtual
camera pans, tilts and zooms over real photographs (scikit-image's and scikit-learn's), each
clip's exact time reversal sits in its twin class, features come from the trained ViT-S/14 of
../shared/real-dinov2 through `spool extract`, and train and test photographs are disjoint.
Mean-linear averages over frames, so it cannot tell a clip from its reversal: at most 0.5.
Measured on this set (2026-12-06, seeds 0 and 1): the Spool head 0.89 and 0.86, mean-linear
0.22. The bound of 0.7 leaves room for seeds and machines; the benchmark's head before the
correlation's token norm and moments reached 0.72 on about six times this data.
"""

import importlib.util
from pathlib import Path

import pytest

from spool.train import TrainConfig, train_head

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "real_motion.py"
TRAIN_PHOTOS = ["astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "rocket"]
TEST_PHOTOS = ["china", "motorcycle", "grace_hopper"]


@pytest.fixture(scope="module")
def real_motion():
    spec = importlib.util.spec_from_file_location("real_motion", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reversal_store(real_motion, real_dinov2, tmp_path_factory):
    photos = {k: v for k, v in real_motion.photographs().items() if k in TRAIN_PHOTOS + TEST_PHOTOS}
    assert sorted(photos) == sorted(TRAIN_PHOTOS + TEST_PHOTOS)
    return real_motion.extract_task(
        tmp_path_factory.mktemp("reversal"), "reversal", photos, TEST_PHOTOS,
        weights=real_dinov2 / "dinov2_vits14_real.safetensors", clips_per_photo=6, frames=8, video_size=128,
        size=112, seed=0,
    )  # fmt: skip


@pytest.mark.slow
def test_the_spool_head_beats_mean_linear_on_held_out_photographs(real_motion, reversal_store, tmp_path):
    def top1(head: str, **options) -> float:
        cfg = TrainConfig(store=str(reversal_store), out=str(tmp_path / head), head=head, device="cpu", seed=0, **options)
        return train_head(cfg, progress=False).top1

    baseline = top1("mean-linear")
    spool = top1("spool", **real_motion.SMALL_DATA, epochs=20, batch_size=16)
    assert baseline <= 0.5  # by construction: a clip and its reversal average alike
    assert spool >= 0.7 and spool >= baseline + 0.3, (spool, baseline)
