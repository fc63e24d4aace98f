"""``spool predict``: a trained head on videos it has never seen, or on another store.

    predictor = Predictor.from_run("runs/toy-spool")      # the head, and how its features were made
    records = predictor.predict("demo/")                    # a folder, list file, video path or list of paths
    records = predictor.predict("other.zarr")               # a store extracted as the run's was

A run records how its store was extracted (``config.json``, ``store.extraction``: the store's
content attributes): backbone, weights identity (hub id, or file and sha256, or random and
seed), transform, T, stride, views, token pooling, and the frames per backbone call. From video
files, ``predict`` decodes, samples and runs the backbone through extract's own pipeline
(``spool.extract.encode_videos``) with those options, keeps the features in memory as float16
(what the store holds), pools tokens as training did and averages each video's clip logits over
its views as train-head's evaluation does (``spool.train.eval_video_logits``). A store is read
through the same FeatureSet and evaluation code, after its schema is checked against the run's.

Weights: the run's are found again from that record; a file's sha256 must match or predict
refuses. A video that cannot be decoded gets a record with the reason, never an exception.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from spool.backbone import FrameEncoder, WeightsIdentity, file_sha256, load_backbone
from spool.checkpoint import HEAD_INPUTS, load_head
from spool.data import FeatureSet, pool_tokens
from spool.decode import DecodeError
from spool.device import resolve_device
from spool.metrics import video_logits
from spool.progress import RateProgress
from spool.sources import VIDEO_EXTENSIONS, VideoEntry, VideoSource, load_source
from spool.stores import FAILED, HDF5_SUFFIXES, ZARR_SUFFIXES, StoreError, open_store
from spool.weights import WeightsError, weights_file_in

OUTPUT_SUFFIXES = (".csv", ".json")
CHECKPOINTS = {"last": "checkpoint_last.pt", "best": "checkpoint_best.pt"}

# Transform of stores made before crop_pct and interpolation were recorded (README, "Preprocessing").
LEGACY_TRANSFORM = {"crop_pct": 1.0, "interpolation": "bilinear"}

# What makes two stores' features the same kind: the head trained on one reads the other.
# (T, L, D and the weights identity are checked beside these.)
SCHEMA_CONTENT_KEYS = ("backbone", "timm_name", "image_size", "crop_pct", "interpolation", "token_pool")
# Where a weights file lies does not change what it computes: its sha256 does.
IDENTITY_KEYS = ("source", "pretrained", "hub_id", "sha256", "seed", "pos_embed")


class PredictError(RuntimeError):
    """A run, store or option that predict cannot use as given; the message says what to do."""


@dataclass(frozen=True)
class PredictConfig:
    run: str  # a train-head run folder (config.json, checkpoints)
    source: str  # a video folder, list file, dataset root, single video, or a .zarr/.h5 store
    out: str | None = None  # .csv or .json; None: a table on the terminal only
    checkpoint: str = "last"  # "last" (metrics.json's final numbers) | "best" | a checkpoint path
    weights: str | None = None  # None: the run's record; a file or folder, or "pretrained"
    store: str | None = None  # keep the features: extract the source into this store first
    format: str = "auto"
    split_files: tuple[str, ...] = ()
    labels_file: str | None = None
    top_k: int = 5
    batch_size: int | None = None  # frames per backbone call; None: the one the run's store was extracted with
    workers: int = 4
    decode_timeout: float = 120.0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.out is not None and Path(self.out).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"--out {self.out}: name the output file .csv or .json")
        checks = [
            (self.top_k >= 1, f"--top-k must be >= 1, got {self.top_k}"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.decode_timeout > 0, f"--decode-timeout must be > 0, got {self.decode_timeout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.store is not None and is_store_path(self.source):
            raise ValueError(f"--store keeps features extracted from videos; {self.source} is a store already")


@dataclass
class Prediction:
    """One video's result. ``status`` is "ok" or "failed" (then ``error`` says why)."""

    video_id: str
    path: str | None  # the video file; None for a video read from a store
    status: str
    error: str = ""
    top_k: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), most likely first
    label: str | None = None  # the true class, when the source has labels
    correct: bool | None = None  # top-1 == label, when labeled
    logits: list[float] | None = None  # (C,) clip logits averaged over the views
    clips: int = 0  # views averaged
    random_weights: bool = False  # the run's features came from a backbone with random weights

    @property
    def prediction(self) -> str | None:
        return self.top_k[0][0] if self.top_k else None

    @property
    def probability(self) -> float | None:
        return self.top_k[0][1] if self.top_k else None


@dataclass
class PredictResult:
    predictions: list[Prediction]
    summary: dict  # videos, predicted, failed, labeled, top1, top_k (when labeled)
    run: dict  # run folder, checkpoint, head, backbone, weights, random_weights
    out: str | None = None

    @property
    def predicted(self) -> int:
        return sum(p.status == "ok" for p in self.predictions)


def is_store_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in ZARR_SUFFIXES + HDF5_SUFFIXES


# --- the run's record ---------------------------------------------------------------------


def run_extraction(run_dir: Path, config: dict) -> dict:
    """How the run's store was extracted: from config.json, or (runs made before Spool kept it
    there) from the store's own attributes, if the store is still the one the run trained on."""
    store_info = config.get("store") or {}
    if store_info.get("extraction"):
        return store_info["extraction"]
    from spool.train import extraction_record

    path = store_info.get("path")
    if not path or not Path(path).exists():
        raise PredictError(
            f"{run_dir / 'config.json'} does not record how its features were extracted (a run made before "
            f"`spool predict`), and its store {path} is not there to read it from. Put the store back at that "
            "path, or train the head again"
        )
    with open_store(path, mode="r") as store:
        if store.attrs.get("fingerprint") != store_info.get("fingerprint"):
            raise PredictError(
                f"{path} is no longer the store {run_dir} was trained on (fingerprint "
                f"{store.attrs.get('fingerprint')}, "
                f"the run's {store_info.get('fingerprint')}), and the run does not record how its features were "
                "extracted. Train the head again on the store as it is now"
            )
        return extraction_record(store)


def _content(extraction: dict) -> dict:
    content = dict(extraction.get("content") or {})
    if "backbone" not in content:
        raise PredictError("the run's store records no extraction options (content attributes); train the head again "
                           "on a store made by `spool extract`")  # fmt: skip
    for key, value in LEGACY_TRANSFORM.items():
        content.setdefault(key, value)
    return content


def _identity(content: dict) -> dict:
    weights = content.get("weights") or {}
    return {k: weights.get(k) for k in IDENTITY_KEYS}


def _weights_words(weights: dict) -> str:
    if weights.get("source") == "random":
        return f"RANDOM weights (seed {weights.get('seed')})"
    if weights.get("source") == "file":
        return f"{weights.get('file')} (sha256 {weights.get('sha256')})"
    return f"hub weights {weights.get('hub_id')}"


def resolve_weights(recorded: dict, override: str | None) -> tuple[str, str | None]:
    """The ``--weights`` to load the run's backbone with, and a warning to show (or None).

    A file is checked against the recorded sha256 before it is loaded; a run on random
    weights takes no other weights, and other weights than the record's are refused."""
    source = recorded.get("source")
    if source == "random":
        if override is not None and override != "random":
            raise WeightsError(
                f"--weights {override}: the run's store was extracted with RANDOM backbone weights (seed "
                f"{recorded.get('seed')}), and its head was trained on those features; other weights would give "
                "features it never saw. Leave --weights out"
            )
        return "random", None
    if override == "random":
        raise WeightsError(f"--weights random: the run's store was extracted with {_weights_words(recorded)}; "
                           "leave --weights out to use them")  # fmt: skip
    if source == "hub":
        if override is None or override == "pretrained":
            return "pretrained", None
        return override, (
            f"--weights {override}: the run's store was extracted with {_weights_words(recorded)}, which have no "
            "sha256 on record, so this file cannot be checked against them; the predictions are right only if it "
            "holds the same tensors (the official or Hugging Face files of that model do)"
        )
    expected = recorded.get("sha256")
    if override == "pretrained":
        raise WeightsError(
            f"--weights pretrained: the run's store was extracted with the file {_weights_words(recorded)}; "
            "pass that file with --weights PATH"
        )
    path = Path(override if override is not None else recorded.get("file") or "").expanduser()
    if override is None and not path.exists():
        raise WeightsError(
            f"the run's backbone weights {recorded.get('file')} are not there (moved, or another machine); "
            f"pass the file with --weights PATH (its sha256 must be {expected})"
        )
    if not path.exists():
        raise WeightsError(f"--weights {override}: no such file or folder")
    weights_file = weights_file_in(path)
    got = file_sha256(weights_file)
    if got != expected:
        given = f"--weights {override}" if override is not None else f"the run's weights file {weights_file}"
        raise WeightsError(
            f"{given} has sha256 {got}, but the run's store was extracted with {recorded.get('file')} of sha256 "
            f"{expected}: the head was trained on that file's features, so this file would give wrong predictions. "
            "Refusing; pass the file with that sha256 (--weights PATH)"
        )
    return str(weights_file), None


def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint in CHECKPOINTS:
        path = run_dir / CHECKPOINTS[checkpoint]
        if not path.is_file():
            raise PredictError(f"{run_dir} holds no {CHECKPOINTS[checkpoint]}: is it a `spool train-head` run folder? "
                               "(--checkpoint last | best | PATH)")  # fmt: skip
        return path
    path = Path(checkpoint)
    if not path.is_file():
        raise PredictError(f"--checkpoint {checkpoint}: no such file; expected last, best or a checkpoint path")
    return path


# --- the predictor ----------------------------------------------------------------------------


class Predictor:
    """A trained head with the recipe of its features. Build with ``Predictor.from_run``.

    ``predict(source)`` returns one ``Prediction`` per video, failed ones included. The
    backbone is loaded on the first prediction from video files (a store needs none)."""

    def __init__(self, head: torch.nn.Module, config: dict, extraction: dict, *, run_dir: Path, checkpoint: Path,
                 weights: str | None = None, device: str | torch.device = "auto"):  # fmt: skip
        self.head = head
        self.config = config
        self.extraction = extraction
        self.content = _content(extraction)
        self.run_dir = run_dir
        self.checkpoint = checkpoint
        self.weights_override = weights
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.head_name = config["head"]
        self.inputs = HEAD_INPUTS[self.head_name]
        self.train = config.get("train") or {}
        self.token_pool = int(self.train.get("token_pool", 1))
        self.class_names = list(extraction["class_names"])
        self.recorded_weights = self.content.get("weights") or {}
        self.random_weights = self.recorded_weights.get("source") == "random"
        self.warnings: list[str] = []
        self._encoder: FrameEncoder | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, *, checkpoint: str = "last", weights: str | None = None,
                 device: str | torch.device = "auto") -> "Predictor":  # fmt: skip
        """The head of ``run_dir`` (``checkpoint``: "last", whose numbers metrics.json reports as
        final; "best"; or a path) on ``device``. ``weights`` overrides where the backbone's weights
        are found (its sha256 is checked against the run's record)."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise PredictError(f"{run_dir} is not a `spool train-head` run folder (no config.json)")
        try:
            config = json.loads(config_path.read_text())
        except ValueError as err:
            raise PredictError(f"{config_path} is not readable JSON ({err})") from err
        extraction = run_extraction(run_dir, config)
        device = resolve_device(device) if isinstance(device, str) else device
        path = _checkpoint_path(run_dir, checkpoint)
        head, saved = load_head(path, map_location=device)
        # The checkpoint carries its own configs; config.json names its store's extraction.
        config = {**config, **{k: v for k, v in saved.items() if v is not None}}
        if saved.get("store") and saved["store"].get("extraction"):
            extraction = saved["store"]["extraction"]
        return cls(head, config, extraction, run_dir=run_dir, checkpoint=path, weights=weights, device=device)

    # -- what the run records --
    def describe(self) -> dict:
        return {
            "run": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "head": self.head_name,
            "classes": self.class_names,
            "backbone": self.content.get("backbone"),
            "weights": self.recorded_weights,
            "random_weights": self.random_weights,
            "sampling": {k: self.content.get(k) for k in ("frames", "stride", "clips")},
            "transform": {k: self.content.get(k) for k in ("image_size", "crop_pct", "interpolation")},
            "token_pool": {"extract": self.content.get("token_pool"), "train": self.token_pool},
        }

    def read_kwargs(self) -> dict[str, Any]:
        c = self.content
        return dict(
            frames=c["frames"], clips=c["clips"], stride=c["stride"], size=c["image_size"], crop_pct=c["crop_pct"],
            interpolation=c["interpolation"], decoder=c.get("decoder", "decord"),
        )  # fmt: skip

    def load_backbone(self) -> FrameEncoder:
        """The run's backbone, weights checked against its record (once; kept for later calls)."""
        if self._encoder is not None:
            return self._encoder
        weights, warning = resolve_weights(self.recorded_weights, self.weights_override)
        if warning:
            self.warnings.append(warning)
        c = self.content
        with warnings.catch_warnings():
            # said once, in every output, as random_weights: not as a Python warning per call
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
            encoder, identity = load_backbone(
                c["backbone"], weights=weights, image_size=c["image_size"], token_pool=c["token_pool"],
                seed=self.recorded_weights.get("seed") or 0,
            )  # fmt: skip
        self._check_identity(identity)
        self._encoder = encoder.to(self.device)
        return self._encoder

    def _check_identity(self, identity: WeightsIdentity) -> None:
        recorded, got = _identity(self.content), _identity({"weights": dataclasses.asdict(identity)})
        if recorded["source"] == "hub" and got["source"] == "file":
            return  # an unverifiable file in place of hub weights: warned about in resolve_weights
        if recorded["pos_embed"] is None and (got["pos_embed"] or {}).get("rule") == "dinov2":
            self.warnings.append(
                "the run's store records no position-table rule: it was extracted before Spool resized DINOv2's "
                "table by the official rule, which moves patch tokens by up to 0.02 in cosine; these predictions may "
                "differ slightly from the run's evaluation. Re-extract and retrain for exact agreement"
            )
        differing = [k for k in IDENTITY_KEYS if recorded[k] is not None and recorded[k] != got[k]]
        if differing:
            diffs = "; ".join(f"{k}: the run's store has {recorded[k]!r}, this backbone {got[k]!r}" for k in differing)
            raise WeightsError(
                f"the backbone loaded for {self.run_dir} does not compute the features its head was trained on "
                f"({diffs}). Extract and train again with this Spool, or pass the run's weights with --weights PATH"
            )

    # -- predicting --
    def predict(
        self,
        source: str | Path | Sequence[str | Path],
        *,
        format: str = "auto",
        split_files: Sequence[str | Path] = (),
        labels_file: str | Path | None = None,
        top_k: int = 5,
        batch_size: int | None = None,
        workers: int = 0,
        decode_timeout: float = 120.0,
        progress: bool = False,
    ) -> list[Prediction]:
        """One Prediction per video of ``source``: a folder, list file or dataset root (as
        ``spool extract`` reads them, with ``format``, ``split_files``, ``labels_file``), one video
        file, a list of video paths, or a ``.zarr``/``.h5`` store (``predict_store``).
        ``batch_size``: frames per backbone call (default: the run's extraction's)."""
        if isinstance(source, (str, Path)) and is_store_path(source):
            return self.predict_store(source, top_k=top_k)
        videos = _video_source(source, format=format, split_files=split_files, labels_file=labels_file)
        names = self._label_names(videos, labels_file)
        encoder = self.load_backbone()
        entries = videos.entries
        bar = RateProgress(total=len(entries), enabled=progress, description="predict")
        batch_size = batch_size or self.extraction.get("batch_size") or 64
        encoded_videos = _encode(entries, encoder, self.device, self.read_kwargs(), batch_size, workers, decode_timeout)
        records: list[Prediction | None] = [None] * len(entries)  # in the source's order, not decoding's
        with bar, contextlib.closing(encoded_videos):
            for v, encoded in encoded_videos:
                entry = entries[v]
                label = names(entry.label)
                if isinstance(encoded, DecodeError):
                    records[v] = Prediction(entry.video_id, str(entry.path), "failed", str(encoded), label=label,
                                            random_weights=self.random_weights)  # fmt: skip
                    bar.advance(failed=True)
                    continue
                logits = self._video_logits({"patches": encoded.patches, "cls": encoded.cls})
                records[v] = self._record(entry.video_id, str(entry.path), logits, label, len(encoded.patches), top_k)
                bar.advance(frames=encoded.patches.shape[0] * encoded.patches.shape[1])
        missing = [Prediction(m, None, "failed", "listed, but not on disk", random_weights=self.random_weights)
                   for m in videos.missing]  # fmt: skip
        return records + missing

    def predict_store(self, path: str | Path, *, top_k: int = 5, file_for_hub: bool = False) -> list[Prediction]:
        """One Prediction per video of the store at ``path``, whose features must be of the kind
        the head was trained on (refused otherwise, naming what differs); its failed and pending
        videos get failed records. Evaluated as train-head evaluates (spool.train.eval_video_logits).
        ``file_for_hub``: a weights file may stand in for the run's hub weights (``--weights PATH``
        with ``--store``, warned about by ``resolve_weights``)."""
        from spool.train import _open_store, eval_video_logits

        try:
            store = _open_store(str(path))
        except Exception as err:
            raise PredictError(str(err)) from err
        try:
            self.check_store(store, file_for_hub=file_for_hub)
            table = store.videos()
            clips = store.clips()
            done = np.flatnonzero(clips.done)
            features = FeatureSet(store, done, token_pool=self.token_pool, inputs=self.inputs, cache="none",
                                  device=self.device, workers=0)  # fmt: skip
            batch_size = int(self.train.get("batch_size", 32))
            videos, vlogits, _ = eval_video_logits(self.head, self.inputs, features, done, batch_size, self.device)
            by_video = dict(zip(videos.tolist(), vlogits))
            names = list(store.class_names)
        finally:
            store.close()
        records = []
        per_video = np.bincount(clips.video_index[done], minlength=len(table.video_id))
        for v, video_id in enumerate(table.video_id):
            label = names[table.label[v]] if 0 <= table.label[v] < len(names) else None
            if v in by_video:
                records.append(self._record(str(video_id), None, by_video[v], label, int(per_video[v]), top_k))
            else:
                why = str(table.error[v]) if table.status[v] == FAILED else "not extracted (pending in the store)"
                records.append(Prediction(str(video_id), None, "failed", why, label=label,
                                          random_weights=self.random_weights))  # fmt: skip
        return records

    def check_store(self, store, *, file_for_hub: bool = False) -> None:
        """Refuse a store whose features are not of the kind the head was trained on."""
        ours = self.content
        theirs = dict(store.attrs.get("content") or {})
        if theirs:
            for key, value in LEGACY_TRANSFORM.items():
                theirs.setdefault(key, value)
        problems = [f"{k}: the run's store has {ours.get(k)!r}, {store.path} has {theirs.get(k)!r}"
                    for k in SCHEMA_CONTENT_KEYS if ours.get(k) != theirs.get(k)]  # fmt: skip
        ours_w, theirs_w = _identity(ours), _identity(theirs)
        if file_for_hub and ours_w["source"] == "hub" and theirs_w["source"] == "file":
            ours_w = theirs_w  # not checkable: said by resolve_weights
        problems += [f"weights.{k}: the run's store has {ours_w[k]!r}, {store.path} has {theirs_w[k]!r}"
                     for k in IDENTITY_KEYS if ours_w[k] != theirs_w[k]]  # fmt: skip
        shapes = {"T (frames per clip)": (self.extraction["num_frames"], store.num_frames),
                  "L (tokens per frame)": (self.extraction["num_tokens"], store.num_tokens),
                  "D (feature width)": (self.extraction["dim"], store.dim)}  # fmt: skip
        problems += [f"{k}: the run's store has {a}, {store.path} has {b}" for k, (a, b) in shapes.items() if a != b]
        if problems:
            raise PredictError(
                f"{store.path} does not hold the kind of features {self.run_dir}'s head was trained on: "
                f"{'; '.join(problems)}. Extract its videos with the run's options, or predict from the video "
                f"files (`spool predict {self.run_dir} VIDEOS`), which does so"
            )

    def _label_names(self, videos: VideoSource, labels_file) -> Any:
        """label index of the source -> class name (None: unlabeled). A list file without
        --labels-file numbers its classes; those numbers are the run's class indices."""
        if videos.format == "list" and labels_file is None:
            names = self.class_names
        else:
            names = videos.class_names
        return lambda label: names[label] if 0 <= label < len(names) else None

    @torch.no_grad()
    def _video_logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """(C,) logits of one video from its float16 features (clips, T, L, D) / (clips, T, D):
        tokens pooled as training did (spool.data.pool_tokens), clip logits averaged over views."""
        if "patches" in features:
            features = {**features, "patches": pool_tokens(features["patches"], self.token_pool)}
        batch = {k: torch.from_numpy(np.ascontiguousarray(features[k])).to(self.device) for k in self.inputs}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.head(*[batch[k].float() for k in self.inputs])
        clip_logits = out.float().cpu().numpy()
        n = len(clip_logits)
        _, vlogits, _ = video_logits(clip_logits, np.zeros(n, np.int64), np.zeros(n, np.int64))
        return vlogits[0]

    def _record(self, video_id: str, path: str | None, logits: np.ndarray, label: str | None, clips: int,
                top_k: int) -> Prediction:  # fmt: skip
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-logits, kind="stable")[: min(top_k, len(logits))]
        ranked = [(self.class_names[i], float(probs[i])) for i in order]
        correct = None if label is None else ranked[0][0] == label
        return Prediction(video_id, path, "ok", "", ranked, label, correct, [float(x) for x in logits], clips,
                          self.random_weights)  # fmt: skip


def _video_source(source, *, format: str, split_files, labels_file) -> VideoSource:
    """What ``spool extract`` reads, plus one video file or a list of video paths."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
            paths = [path]
        else:
            return load_source(path, split_files=[Path(s) for s in split_files],
                               labels_file=Path(labels_file) if labels_file else None, fmt=format)  # fmt: skip
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise ValueError("no videos given to predict")
    # a file that is not there still gets its row: decoding it says "missing file"
    entries = [VideoEntry(p.resolve(), str(p), -1, None) for p in paths]
    return VideoSource(root=Path.cwd(), format="paths", entries=entries, class_names=[])


def _encode(entries: list[VideoEntry], encoder, device, read_kwargs, batch_size, workers, decode_timeout):
    from spool.extract import encode_videos

    jobs = ((v, e.path) for v, e in enumerate(entries))
    return encode_videos(jobs, encoder, device, read_kwargs=read_kwargs, batch_size=batch_size, workers=workers,
                         decode_timeout=decode_timeout)  # fmt: skip


# --- the command's library call ------------------------------------------------------------


def summarize(predictions: list[Prediction], class_names: Sequence[str]) -> dict:
    """Counts, and top-1 / top-k over the predicted videos that have a true label."""
    ok = [p for p in predictions if p.status == "ok"]
    labeled = [p for p in ok if p.label is not None]
    summary: dict[str, Any] = {
        "videos": len(predictions),
        "predicted": len(ok),
        "failed": len(predictions) - len(ok),
        "labeled": len(labeled),
    }
    if labeled:
        # from the logits, not the listed classes: --top-k 1 must not make top-5 look worse
        k = min(5, len(class_names))
        index = {name: c for c, name in enumerate(class_names)}
        in_top_k = [index.get(p.label, -1) in np.argsort(-np.asarray(p.logits), kind="stable")[:k] for p in labeled]
        summary["top1"] = sum(bool(p.correct) for p in labeled) / len(labeled)
        summary["top_k"] = {"k": k, "accuracy": sum(in_top_k) / len(labeled)}
        unknown = sorted({p.label for p in labeled} - set(class_names))
        if unknown:
            summary["labels_unknown_to_the_head"] = unknown  # those videos count as wrong
    return summary


def run_predict(cfg: PredictConfig, *, progress: bool = True, command: str = "") -> PredictResult:
    """Predict every video of ``cfg.source`` with the head of ``cfg.run``; write ``cfg.out``.

    With ``cfg.store`` the source is first extracted into that store (``spool extract`` with the
    run's options; re-running resumes), then the store is evaluated."""
    predictor = Predictor.from_run(cfg.run, checkpoint=cfg.checkpoint, weights=cfg.weights, device=cfg.device)
    if cfg.store is not None:
        predictions = _predict_through_store(predictor, cfg, progress, command)
    else:
        predictions = predictor.predict(
            cfg.source, format=cfg.format, split_files=cfg.split_files, labels_file=cfg.labels_file, top_k=cfg.top_k,
            batch_size=cfg.batch_size, workers=cfg.workers, decode_timeout=cfg.decode_timeout, progress=progress,
        )  # fmt: skip
    if not predictions:
        raise PredictError(f"{cfg.source} holds no videos to predict")
    result = PredictResult(predictions, summarize(predictions, predictor.class_names),
                           {**predictor.describe(), "warnings": predictor.warnings}, cfg.out)  # fmt: skip
    if cfg.out is not None:
        write_predictions(cfg.out, result)
    return result


def _predict_through_store(predictor: Predictor, cfg: PredictConfig, progress: bool, command: str) -> list[Prediction]:
    from spool.extract import ExtractConfig, run_extract

    source = Path(cfg.source)
    if source.is_file() and source.suffix.lower() in VIDEO_EXTENSIONS:
        raise ValueError(f"--store keeps the features of a folder or list file; {source} is one video: "
                         "leave --store out")  # fmt: skip
    c = predictor.content
    weights, warning = resolve_weights(predictor.recorded_weights, cfg.weights)
    if warning:
        predictor.warnings.append(warning)
    extract_cfg = ExtractConfig(
        source=cfg.source, out=cfg.store, format=cfg.format, split_files=cfg.split_files, labels_file=cfg.labels_file,
        backbone=c["backbone"], weights=weights, image_size=c["image_size"], crop_pct=c["crop_pct"],
        interpolation=c["interpolation"], token_pool=c["token_pool"], frames=c["frames"], stride=c["stride"],
        clips=c["clips"], decoder=c.get("decoder", "decord"), workers=cfg.workers, decode_timeout=cfg.decode_timeout,
        batch_size=cfg.batch_size or predictor.extraction.get("batch_size") or 64, device=cfg.device,
        seed=predictor.recorded_weights.get("seed") or 0,
    )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")  # said in every output instead
            result = run_extract(extract_cfg, command=command, progress=progress)
    except StoreError as err:
        if "--overwrite" not in str(err):
            raise
        raise PredictError(
            f"--store {cfg.store} exists and holds other features or another video list than {cfg.source} extracted "
            "with the run's options; delete it or choose another --store path"
        ) from None
    missing = [Prediction(m, None, "failed", "listed, but not on disk", random_weights=predictor.random_weights)
               for m in result.missing]  # fmt: skip
    return predictor.predict_store(cfg.store, top_k=cfg.top_k, file_for_hub=warning is not None) + missing


# --- output files ------------------------------------------------------------------------------

CSV_COLUMNS = ("video_id", "path", "status", "error", "prediction", "probability", "top_k", "label", "correct", "clips",
               "random_weights")  # fmt: skip


def write_predictions(path: str | Path, result: PredictResult) -> None:
    """``.json``: the run, the summary and every record (logits included); ``.csv``: one row per
    video, the top-k as ``class:probability`` separated by spaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".json":
        payload = {"run": result.run, "summary": result.summary,
                   "predictions": [_json_record(p) for p in result.predictions]}  # fmt: skip
        if result.run.get("random_weights"):
            payload = {"warning": RANDOM_WARNING, **payload}
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    else:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for p in result.predictions:
                writer.writerow([
                    p.video_id, p.path or "", p.status, p.error, p.prediction or "",
                    "" if p.probability is None else f"{p.probability:.6f}",
                    " ".join(f"{c}:{q:.6f}" for c, q in p.top_k), p.label or "",
                    "" if p.correct is None else str(p.correct).lower(), p.clips, str(p.random_weights).lower(),
                ])  # fmt: skip
    tmp.replace(path)


RANDOM_WARNING = (
    "the run's features come from a backbone with RANDOM weights (--weights random): these predictions test the "
    "code, they mean nothing about the videos"
)


def _json_record(p: Prediction) -> dict:
    record = dataclasses.asdict(p)
    record["top_k"] = [{"class": c, "probability": q} for c, q in p.top_k]
    record["prediction"] = p.prediction
    return record
