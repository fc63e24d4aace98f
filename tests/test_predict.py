"""``spool predict``: a head trained on the toy store, run on the toy's video files again.

The run's own evaluation on its store is the reference: predicting the same videos from their
files must give the same per-video logits (float16 features both ways) and metrics.json's top-1.
The tests on the toy are marked slow (it is extracted and three heads trained on it, and a
random ViT-S runs on every video); the checks of weights and options are not.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spool.checkpoint import HEAD_INPUTS, load_checkpoint, load_head, save_checkpoint
from spool.cli.app import app
from spool.extract import ExtractConfig, run_extract
from spool.predict import PredictConfig, PredictError, Predictor, resolve_weights, run_predict, summarize
from spool.stores import open_store
from spool.toy import TOY_CLASSES, make_toy
from spool.train import TrainConfig, eval_video_logits, load_features, train_head
from spool.weights import WeightsError

runner = CliRunner()

# two views per video: predict must average them as the evaluation does
EXTRACT = dict(weights="random", image_size=28, frames=3, clips=2, workers=0, batch_size=12, seed=0, device="cpu")
TRAIN = dict(depth=1, num_heads=2, dim=8, local_frame_range=1, epochs=2, batch_size=8, lr=3e-3, warmup=0.5,
             val_fraction=0.5, workers=0, device="cpu")  # fmt: skip
HEADS = ("spool", "mean-linear", "attentive-probe")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy videos, their store, and one run per head trained on it."""
    root = tmp_path_factory.mktemp("predict")
    videos = root / "toy"
    make_toy(videos, videos_per_class=2, num_frames=8, size=32, seed=0)
    store = root / "toy.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RANDOM weights were requested"
        run_extract(ExtractConfig(source=str(videos), out=str(store), **EXTRACT), progress=False)
    runs = {}
    for head in HEADS:
        runs[head] = root / "runs" / head
        train_head(TrainConfig(store=str(store), out=str(runs[head]), head=head, **TRAIN), progress=False)
    predictors = {}  # one per head, so the backbone is built once per module

    def predictor(head: str) -> Predictor:
        if head not in predictors:
            predictors[head] = Predictor.from_run(runs[head], device="cpu")
        return predictors[head]

    return {"root": root, "videos": videos, "store": store, "runs": runs, "predictor": predictor}


def run_evaluation(run: Path) -> dict[str, np.ndarray]:
    """video id -> logits of the run's own evaluation on its store (the last checkpoint)."""
    model, saved = load_head(run / "checkpoint_last.pt")
    cfg = TrainConfig(**{**saved["train"], "cache": "memory"})
    features, splits = load_features(cfg)
    try:
        videos, logits, _ = eval_video_logits(model, HEAD_INPUTS[saved["head"]], features, splits.eval,
                                              cfg.batch_size, torch.device("cpu"))  # fmt: skip
        ids = features.store.videos().video_id
    finally:
        features.store.close()
    return {str(ids[v]): row for v, row in zip(videos, logits)}


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_predicting_the_files_gives_the_runs_own_evaluation(toy, head):
    run = toy["runs"][head]
    reference = run_evaluation(run)
    records = toy["predictor"](head).predict(toy["videos"], top_k=1)
    assert len(records) == 12 and all(r.status == "ok" for r in records)
    by_id = {r.video_id: r for r in records}
    for video_id, logits in reference.items():
        r = by_id[video_id]
        assert r.clips == 2 and r.random_weights
        # the same float16 features either way; only the head's batches differ
        np.testing.assert_allclose(r.logits, logits, rtol=1e-4, atol=1e-4, err_msg=video_id)
        assert r.prediction == toy_class(video_id) if r.correct else r.prediction != toy_class(video_id)
    final = json.loads((run / "metrics.json").read_text())["final"]
    summary = summarize([by_id[v] for v in reference], sorted(TOY_CLASSES))
    assert summary["top1"] == pytest.approx(final["top1"]) and summary["labeled"] == final["num_videos"]
    # top-5 from the logits, though only the top-1 class was listed per video
    assert summary["top_k"] == {"k": 5, "accuracy": pytest.approx(final["top5"])}


def toy_class(video_id: str) -> str:
    return video_id.split("/")[0]


@pytest.mark.slow
def test_a_store_is_evaluated_as_the_run_evaluates_it(toy):
    run = toy["runs"]["spool"]
    from_store = {r.video_id: r for r in toy["predictor"]("spool").predict(toy["store"])}
    reference = run_evaluation(run)
    assert len(from_store) == 12
    for video_id, logits in reference.items():
        np.testing.assert_allclose(from_store[video_id].logits, logits, rtol=1e-5, atol=1e-5)
        assert from_store[video_id].label == toy_class(video_id) and from_store[video_id].path is None


@pytest.mark.slow
def test_command_writes_csv_and_json_and_says_random_weights(toy, tmp_path):
    run = toy["runs"]["mean-linear"]
    result = runner.invoke(app, ["predict", str(run), str(toy["videos"]), "--out", str(tmp_path / "p.csv"),
                                 "--workers", "0", "--device", "cpu", "--top-k", "3", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output  # under -q too
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert all(r["random_weights"] == "true" and len(r["top_k"].split()) == 3 for r in rows)
    assert all(r["label"] == toy_class(r["video_id"]) and r["correct"] in ("true", "false") for r in rows)
    result = runner.invoke(app, ["predict", str(run), str(toy["store"]), "--out", str(tmp_path / "p.json"), "-q",
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "p.json").read_text())
    assert "RANDOM" in saved["warning"] and saved["run"]["random_weights"] is True
    assert saved["summary"]["predicted"] == saved["summary"]["labeled"] == 12 and 0 <= saved["summary"]["top1"] <= 1
    assert all(p["random_weights"] and len(p["logits"]) == 6 for p in saved["predictions"])


@pytest.mark.slow
def test_bad_videos_get_a_row_with_the_reason(toy, tmp_path):
    folder = tmp_path / "demo"
    (folder / "growing").mkdir(parents=True)
    shutil.copy(toy["videos"] / "growing" / "growing_000.mp4", folder / "growing" / "a.mp4")
    (folder / "growing" / "empty.mp4").write_bytes(b"")
    (folder / "growing" / "garbage.mp4").write_bytes(b"not a video at all" * 100)
    result = runner.invoke(app, ["predict", str(toy["runs"]["spool"]), str(folder), "--out", str(tmp_path / "p.csv"),
                                 "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {r["video_id"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert rows["growing/a.mp4"]["status"] == "ok" and rows["growing/a.mp4"]["label"] == "growing"
    assert rows["growing/empty.mp4"]["status"] == "failed" and "empty file" in rows["growing/empty.mp4"]["error"]
    assert rows["growing/garbage.mp4"]["status"] == "failed" and rows["growing/garbage.mp4"]["error"]
    assert "1 of 3 videos predicted, 2 failed" in result.output and "failed growing/empty.mp4" in result.output
    # nothing predicted: every row is still written, and the exit code says so (as extract's does)
    (folder / "growing" / "a.mp4").unlink()
    result = runner.invoke(app, ["predict", str(toy["runs"]["spool"]), str(folder), "--out", str(tmp_path / "q.json"),
                                 "--workers", "0", "--device", "cpu", "-q"])  # fmt: skip
    assert result.exit_code == 1 and "no video was predicted" in result.output
    assert [p["status"] for p in json.loads((tmp_path / "q.json").read_text())["predictions"]] == ["failed", "failed"]


@pytest.mark.slow
def test_one_video_and_a_list_of_paths(toy, tmp_path):
    predictor = toy["predictor"]("spool")
    video = toy["videos"] / "moving_left" / "moving_left_001.mp4"
    [one] = predictor.predict(video)
    assert one.status == "ok" and one.video_id == str(video) and one.label is None and one.correct is None
    assert len(one.top_k) == 5 and one.top_k[0][1] >= one.top_k[-1][1]
    two = predictor.predict([video, tmp_path / "nope.mp4"], top_k=2)
    np.testing.assert_allclose(two[0].logits, one.logits)
    assert two[1].status == "failed" and "missing file" in two[1].error


@pytest.mark.slow
def test_an_empty_folder_is_an_error(toy, tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(toy["runs"]["spool"]), str(tmp_path / "empty"), "--device", "cpu"])
    assert result.exit_code == 2 and "no videos found" in result.output


@pytest.mark.slow
def test_a_store_of_another_backbone_or_shape_is_refused(toy, tmp_path):
    other = tmp_path / "other.zarr"
    folder = tmp_path / "two"
    shutil.copytree(toy["videos"] / "growing", folder / "growing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_extract(ExtractConfig(source=str(folder), out=str(other), **{**EXTRACT, "seed": 1, "image_size": 42}),
                    progress=False)  # fmt: skip
    with pytest.raises(PredictError) as err:
        Predictor.from_run(toy["runs"]["spool"], device="cpu").predict(other)
    message = str(err.value)
    assert "weights.seed: the run's store has 0, " in message and "has 1" in message
    assert "image_size" in message and "L (tokens per frame): the run's store has 4" in message
    result = runner.invoke(app, ["predict", str(toy["runs"]["spool"]), str(other), "--device", "cpu"])
    assert result.exit_code == 2 and "does not hold the kind of features" in result.output


def test_weights_are_found_from_the_record_and_checked(tmp_path):
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    good.write_bytes(b"the weights the store was extracted with")
    bad.write_bytes(b"some other weights")
    from spool.backbone import file_sha256

    recorded = {"source": "file", "pretrained": True, "file": str(good), "sha256": file_sha256(good)}
    assert resolve_weights(recorded, None) == (str(good), None)
    assert resolve_weights(recorded, str(good)) == (str(good), None)
    with pytest.raises(WeightsError, match=r"bad.safetensors has sha256 .*Refusing"):
        resolve_weights(recorded, str(bad))
    good.rename(tmp_path / "moved.safetensors")
    with pytest.raises(WeightsError, match="are not there .* pass the file with --weights PATH"):
        resolve_weights(recorded, None)
    assert resolve_weights(recorded, str(tmp_path / "moved.safetensors"))[0].endswith("moved.safetensors")
    with pytest.raises(WeightsError, match="pass that file with --weights PATH"):
        resolve_weights(recorded, "pretrained")
    random = {"source": "random", "pretrained": False, "seed": 3}
    assert resolve_weights(random, None) == ("random", None)
    with pytest.raises(WeightsError, match="RANDOM backbone weights"):
        resolve_weights(random, str(bad))
    hub = {"source": "hub", "pretrained": True, "hub_id": "timm/vit_small_patch14_dinov2.lvd142m"}
    assert resolve_weights(hub, None) == ("pretrained", None)
    path, warning = resolve_weights(hub, str(bad))
    assert path == str(bad) and "cannot be checked" in warning


@pytest.mark.slow
def test_wrong_weights_for_a_run_are_refused_by_the_command(toy, tmp_path):
    other = tmp_path / "w.safetensors"
    other.write_bytes(b"x")
    result = runner.invoke(app, ["predict", str(toy["runs"]["spool"]), str(toy["videos"]), "--weights", str(other),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2 and "RANDOM backbone weights" in result.output and "Leave --weights out" in result.output


@pytest.mark.slow
def test_a_run_made_before_predict_reads_its_stores_attributes(toy, tmp_path):
    run = tmp_path / "old-run"
    shutil.copytree(toy["runs"]["spool"], run)
    config = json.loads((run / "config.json").read_text())
    del config["store"]["extraction"]
    (run / "config.json").write_text(json.dumps(config))
    payload = load_checkpoint(run / "checkpoint_last.pt")
    del payload["store"]["extraction"]
    save_checkpoint(run / "checkpoint_last.pt", payload)
    predictor = Predictor.from_run(run, device="cpu")
    assert predictor.extraction == toy["predictor"]("spool").extraction
    config["store"]["path"] = str(tmp_path / "gone.zarr")
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(PredictError, match="does not record how its features were extracted .*gone.zarr is not there"):
        Predictor.from_run(run, device="cpu")


@pytest.mark.slow
def test_store_option_keeps_the_features(toy, tmp_path):
    kept = tmp_path / "kept.zarr"
    cfg = PredictConfig(run=str(toy["runs"]["spool"]), source=str(toy["videos"]), store=str(kept), workers=0,
                        device="cpu", out=str(tmp_path / "p.json"))  # fmt: skip
    result = run_predict(cfg, progress=False)
    from_store = {r.video_id: r for r in toy["predictor"]("spool").predict(toy["store"])}
    assert result.predicted == 12
    for r in result.predictions:
        np.testing.assert_allclose(r.logits, from_store[r.video_id].logits, rtol=1e-5, atol=1e-5)
    with open_store(kept) as store, open_store(toy["store"]) as original:
        assert store.attrs["content"] == original.attrs["content"]
        np.testing.assert_array_equal(store.read_patches([0, 1]), original.read_patches([0, 1]))


def test_options_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="--out p.txt: name the output file .csv or .json"):
        PredictConfig(run="r", source="s", out="p.txt")
    with pytest.raises(ValueError, match="--top-k must be >= 1"):
        PredictConfig(run="r", source="s", top_k=0)
    result = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 2 and "not a `spool train-head` run folder" in result.output


@pytest.mark.slow
def test_an_unknown_checkpoint_is_named(toy):
    result = runner.invoke(app, ["predict", str(toy["runs"]["spool"]), str(toy["videos"]), "--checkpoint", "nope.pt"])
    assert result.exit_code == 2 and "--checkpoint nope.pt: no such file" in result.output


def test_options_reach_the_predict_config(monkeypatch, tmp_path):
    seen = {}

    def fake_run_predict(cfg, *, progress, command):
        seen["cfg"], seen["progress"] = cfg, progress
        raise KeyboardInterrupt

    monkeypatch.setattr("spool.predict.run_predict", fake_run_predict)
    result = runner.invoke(app, ["predict", "run", "videos", "--out", "p.json", "--checkpoint", "best", "--weights",
                                 "w.pth", "--store", "s.zarr", "--top-k", "2", "--batch-size", "16", "--workers", "1",
                                 "--decode-timeout", "9", "--device", "cpu", "-q"])  # fmt: skip
    assert result.exit_code == 130 and "s.zarr keeps every finished video" in result.output
    cfg = seen["cfg"]
    assert (cfg.run, cfg.source, cfg.out, cfg.checkpoint, cfg.weights, cfg.store) == (
        "run", "videos", "p.json", "best", "w.pth", "s.zarr")  # fmt: skip
    assert (cfg.top_k, cfg.batch_size, cfg.workers, cfg.decode_timeout, cfg.device) == (2, 16, 1, 9.0, "cpu")
    assert seen["progress"] is False
