"""The `spool` command. Each command parses its options into a config and calls one library function."""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from spool.progress import make_console

app = typer.Typer(
    name="spool",
    help="Feature cache and temporal heads on frozen video foundation-model features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = make_console(stderr=True)


@app.callback()
def _setup() -> None:
    # Python warnings (random weights, ...) as one line each, without file and source line.
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    warn(str(message))


def warn(message: str) -> None:
    # escape: a path or id holding "[...]" is text, not rich markup (it would vanish from the line)
    console.print(f"[yellow]warning:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def _fail(err: Exception, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {escape(str(err))}")
    raise typer.Exit(code)


def _command_line() -> str:
    return shlex.join(["spool", *sys.argv[1:]])


@app.command()
def extract(
    source: Annotated[Path, typer.Argument(help="Folder of videos, a 'path label' list file, or a dataset root.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Store to write: .zarr (default format) or .h5.")],
    format: Annotated[str, typer.Option("--format", help="auto|folder|list|ucf101|hmdb51|kinetics|ssv2.")] = "auto",
    split_file: Annotated[
        Optional[list[Path]], typer.Option("--split-file", help="Official split file(s); repeat the option.")
    ] = None,
    labels_file: Annotated[Optional[Path], typer.Option("--labels-file", help="SSv2 labels JSON or class names.")] = None,
    backbone: Annotated[
        str, typer.Option(help="dinov2_vit{s,b,l,g}14[_reg] or any timm ViT name (other models are refused).")
    ] = "dinov2_vits14",
    weights: Annotated[
        str, typer.Option(help="'pretrained' (timm hub cache); an official DINOv2 .pth, a timm .safetensors, or "
                               "Hugging Face facebook/dinov2-* files (a file or snapshot folder); or 'random' (tests only).")
    ] = "pretrained",
    size: Annotated[int, typer.Option(help="Centre crop size x size fed to the backbone; a multiple of the patch size (14).")] = 224,
    crop_pct: Annotated[
        float, typer.Option(help="Shorter side resized to size / crop-pct before the crop; 0.875 is DINOv2's "
                                 "evaluation transform (256 then 224), 1.0 resizes straight to size.")
    ] = 0.875,
    interpolation: Annotated[str, typer.Option(help="Resize filter: bicubic (DINOv2's evaluation) or bilinear.")] = "bicubic",
    token_pool: Annotated[int, typer.Option(help="Average P x P patches before writing.")] = 1,
    frames: Annotated[int, typer.Option(help="Frames per clip (T).")] = 16,
    stride: Annotated[Optional[int], typer.Option(help="Fixed frame step; default: T frames spread over the video.")] = None,
    clips: Annotated[int, typer.Option(help="Temporal views per video.")] = 1,
    decoder: Annotated[str, typer.Option(help="decord (PyAV as fallback) or pyav.")] = "decord",
    workers: Annotated[
        Optional[int],
        typer.Option(help="Decoding processes; 0 decodes inline, without --decode-timeout: a decoder that hangs or "
                          "crashes in native code then stops the run. Default: from the machine: "
                          "with a GPU, one per core but one (at most 16), to keep the backbone fed; CPU-only, 0 on "
                          "1-2 cores (a worker would take a core from the backbone: about 0.6 of inline speed there), "
                          "else a quarter of the cores. The summary line says the number used."),
    ] = None,
    decode_timeout: Annotated[
        float, typer.Option(help="Seconds before a video's decoder is killed (decode workers only).")
    ] = 120.0,
    batch_size: Annotated[int, typer.Option(help="Frames per backbone call.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for --weights random.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store made with other options.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Try videos recorded as failed again.")] = False,
    shard: Annotated[
        Optional[str],
        typer.Option(help="i/n: extract only shard i of n (0-based), e.g. one task of a job array; "
                          "finish with `spool merge-shards`. Under torchrun the rank is the shard."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Decode each video once, run the frozen backbone, write per-frame patch tokens. Re-run to resume.

    Several processes can write one store: `torchrun --nproc-per-node 8 -m spool extract ...`
    (one rank per GPU, rank 0 merges at the end), or `--shard i/n` per job-array task."""
    from spool.backbone import WeightsError
    from spool.distributed import Shard, parse_shard, torchrun_env
    from spool.extract import ExtractConfig, run_extract
    from spool.stores import StoreError

    rank = torchrun_env()
    try:
        parsed = parse_shard(shard) if shard is not None else Shard()
        if rank is not None:
            if shard is not None:
                raise ValueError("--shard and torchrun both split the videos; under torchrun leave --shard out")
            parsed = Shard(rank.rank, rank.world_size)
            quiet = quiet or rank.rank != 0  # one progress display for the whole job
        cfg = ExtractConfig(
            source=str(source), out=str(out), format=format,
            split_files=tuple(str(p) for p in split_file or ()),
            labels_file=str(labels_file) if labels_file else None,
            backbone=backbone, weights=weights, image_size=size, crop_pct=crop_pct, interpolation=interpolation,
            token_pool=token_pool, frames=frames,
            stride=stride, clips=clips, decoder=decoder, workers=workers, decode_timeout=decode_timeout,
            batch_size=batch_size, device=device, seed=seed, overwrite=overwrite, retry_failed=retry_failed,
            shard=parsed,
        )  # fmt: skip
        result = run_extract(cfg, command=_command_line(), progress=not quiet, torchrun=rank)
    except (ValueError, FileNotFoundError, StoreError, WeightsError) as err:
        _fail(err)
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted:[/] {out} keeps every finished video; re-run the same command to resume")
        raise typer.Exit(130)
    if not quiet:
        who = f"{out} (shard {cfg.shard})" if not cfg.shard.whole else f"{out}"
        console.print(
            f"{who}: {result.done} extracted, {result.failed} failed, {result.skipped} already done "
            f"({result.videos_per_s:.1f} videos/s, {result.frames_per_s:.0f} frames/s, "
            f"{result.workers or 'no'} decode worker{'s' if result.workers != 1 else ''}"
            f"{'' if workers is not None else ', the default here'})"
        )
        for video_id, reason in result.failures[:10]:
            console.print(f"  [red]failed[/] {escape(video_id)}: {escape(reason)}")
        if len(result.failures) > 10:
            console.print(f"  ... {len(result.failures) - 10} more; see `spool info {out}`")
        if result.short:
            warn(f"{result.short} videos are shorter than one clip: frames repeat (see frame_indices)")
        if result.missing:
            shown = ", ".join(result.missing[:5])
            warn(f"{len(result.missing)} listed videos are not on disk (skipped), e.g. {shown}")
        if result.shards is not None:
            _print_shards(result.shards, out, rank is not None)
    if result.unlabeled:
        # said under -q too: a store without labels cannot be trained on, and nothing else says why
        where = (f"{result.unlabeled} videos lie directly in {source}, not in a class sub-folder"
                 if result.source_format == "folder" else f"{result.unlabeled} videos have no label")  # fmt: skip
        warn(f"{where}: they are stored unlabeled (label -1) and `spool train-head` cannot train on them; "
             "put each class's videos in SOURCE/<class>/ (or use a list or split file with labels)")
    if result.total_done == 0:
        console.print("[bold red]error:[/] no video was extracted")
        raise typer.Exit(1)


def _print_shards(report, out: Path, torchrun: bool) -> None:
    if report.complete:
        console.print(f"{out}: all {report.count} shards finished and merged; no video is pending")
        return
    by_shard = ", ".join(f"{i}: {n}" for i, n in sorted(report.pending_by_shard.items())[:8])
    console.print(
        f"{out}: {len(report.finished)} of {report.count} shards finished; {report.pending_videos} videos pending "
        f"(by shard {by_shard}). Run the missing shards, then `spool merge-shards {out}` to merge and check."
        if not torchrun else f"{out}: {report.pending_videos} videos still pending; re-run the same command to resume"
    )


@app.command("merge-shards")
def merge_shards(
    store: Annotated[Path, typer.Argument(help="A store written with --shard i/n (or torchrun).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Merge the shards' records into the store and check that every shard finished.

    Exit 0 when no video is pending (or the store has no shards: nothing to merge); 1 when
    some are, naming their shards (re-run those with the same command); 2 when a shard is
    still writing the store."""
    from spool.stores import StoreError
    from spool.stores.shards import merge_shards as run_merge

    try:
        report = run_merge(store)
    except (StoreError, FileNotFoundError) as err:
        _fail(err)
    if report.count == 0:  # not a sharded store: no journals or markers were ever written
        if as_json:
            typer.echo(json.dumps({**report.to_dict(), "nothing_to_merge": True}, indent=2))
        else:
            pending = f"; {report.pending_videos} videos are pending (re-run `spool extract`)" if report.pending_videos else ""
            console.print(f"{store}: nothing to merge; it holds no shard records (it was not written with --shard "
                          f"or under torchrun){pending}", highlight=False, soft_wrap=True)  # fmt: skip
        return
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_shards(report, store, torchrun=False)
    if not report.complete:
        raise typer.Exit(1)


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="A feature store (.zarr or .h5).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Schema, counts per split and class, failures, size on disk and backbone of a store."""
    from spool.stores import StoreError, open_store
    from spool.stores.summary import summarize

    try:
        with open_store(store, mode="r") as fs:
            summary = summarize(fs)
    except (StoreError, FileNotFoundError) as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(summary, make_console())


def _print_summary(summary: dict, out) -> None:
    from rich.table import Table

    attrs = summary["attrs"]
    t, l, d = summary["clip_shape"]
    weights = attrs.get("weights", {})
    out.print(f"[bold]{summary['path']}[/]  schema v{attrs.get('schema_version')}, spool {attrs.get('spool_version')}")
    out.print(
        f"backbone {attrs.get('backbone')} ({weights.get('source')}, pretrained={weights.get('pretrained')}), "
        f"image {attrs.get('image_size')} px, patch {attrs.get('patch_size')}, token pool {attrs.get('token_pool')}"
    )
    transform, pos = attrs.get("transform"), weights.get("pos_embed")
    if transform:
        out.print(f"frames: shorter side to {transform['resize']} ({transform['interpolation']}), centre crop {transform['crop']}")
    if pos:
        out.print(f"position table: {pos['rule']} rule (bicubic, antialias {pos['antialias']}"
                  f"{', offset ' + str(pos['offset']) if pos.get('offset') else ''})")
    out.print(f"clips (T, L, D) = ({t}, {l}, {d}), sampling {attrs.get('sampling')}")
    out.print(f"videos {summary['num_videos']}: {summary['status']}; {summary['done_clips']} clips with features")
    if summary.get("short_videos"):
        out.print(f"{summary['short_videos']} done videos are shorter than one clip: their frames repeat")
    out.print(f"on disk {summary['bytes_on_disk'] / 2**20:.1f} MiB")
    if summary.get("unmerged_shard_videos"):
        out.print(
            f"[yellow]{summary['unmerged_shard_videos']} videos finished by shards are not merged yet[/] (shown as "
            f"pending): run `spool merge-shards {summary['path']}`"
        )
    table = Table("split", "done videos")
    for split, n in summary["done_videos_per_split"].items():
        if n:
            table.add_row(split, str(n))
    out.print(table)
    classes = Table("class", "done videos")
    for name, n in summary["done_videos_per_class"].items():
        classes.add_row(name, str(n))
    out.print(classes)
    if summary["failures"]:
        failures = Table("failed video", "reason")
        for f in summary["failures"]:
            failures.add_row(f["video_id"], f["reason"])
        out.print(failures)
        if summary["num_failed"] > len(summary["failures"]):
            out.print(f"... and {summary['num_failed'] - len(summary['failures'])} more failures (--json lists them)")


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="A feature store (.zarr or .h5).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    repair: Annotated[
        bool,
        typer.Option(help="Mark the damaged videos pending, so that re-running the same `spool extract` command "
                          "extracts them again."),
    ] = False,
) -> None:
    """Read every DONE video's features back; name each missing or damaged chunk. Exit 1 if any.

    With --repair, the videos with damaged features are marked pending (exit 0 if that covers
    every problem); re-run the `spool extract` command that made the store to re-extract them."""
    from spool.stores import StoreError
    from spool.stores.verify import repair as repair_store
    from spool.stores.verify import verify as verify_store

    try:
        report = verify_store(store)
        repaired = repair_store(store, report) if repair else []
    except StoreError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "repaired": repaired}, indent=2))
    else:
        out = make_console()
        out.print(
            f"{report.path}: {report.num_videos} videos ({report.done} done, {report.failed} failed, "
            f"{report.pending} pending), {report.clips_checked} clips checked"
        )
        for p in report.problems[:50]:
            out.print(f"  [red]{p.kind}[/] " + escape(f"{p.where}: {p.message}" + (f" (video {p.video_id})" if p.video_id else "")))
        if len(report.problems) > 50:
            out.print(f"  ... {len(report.problems) - 50} more (--json lists them)")
        if report.ok:
            out.print("[green]ok[/]")
        else:
            out.print(f"[bold red]{len(report.problems)} problems in {len(report.bad_videos)} videos[/]")
        if repaired:
            out.print(
                f"repaired: {len(repaired)} videos marked pending; re-run the same `spool extract ... --out {store}` "
                "command to extract them again"
            )
        if repair and report.unrepairable:
            out.print(
                f"[bold red]{len(report.unrepairable)} problems are in the store's tables or attributes[/], which "
                f"re-extracting videos does not rewrite: re-create the store (`spool extract ... --overwrite`)"
            )
        elif not repair and not report.ok:
            out.print(f"`spool verify --repair {store}` marks the damaged videos for re-extraction")
    if not report.ok and not (repair and not report.unrepairable):
        raise typer.Exit(1)


@app.command("make-toy")
def make_toy(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the toy dataset into.")],
    videos_per_class: Annotated[int, typer.Option(help="Videos per class.")] = 8,
    frames: Annotated[int, typer.Option(help="Frames per video.")] = 16,
    size: Annotated[int, typer.Option(help="Frame width and height in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a small folder-per-class MP4 dataset whose classes differ only in temporal order."""
    from spool.toy import make_toy as write_toy

    try:
        paths = write_toy(out_dir, videos_per_class=videos_per_class, num_frames=frames, size=size, seed=seed)
    except ValueError as err:
        _fail(err)
    console.print(f"wrote {len(paths)} videos to {out_dir}")


@app.command("train-head")
def train_head(
    store: Annotated[Path, typer.Argument(help="A feature store written by `spool extract`.")],
    out: Annotated[Optional[Path], typer.Option(help="Run folder; default runs/<store name>-<head>.")] = None,
    head: Annotated[
        str,
        typer.Option(help="spool | full (all tokens attend all) | factorized (space, then time) | "
                          "mean-linear (DINOv2 protocol) | attentive-probe (V-JEPA)."),
    ] = "spool",
    heads: Annotated[int, typer.Option("--heads", help="Attention heads per block.")] = 6,
    lookahead: Annotated[Optional[int], typer.Option(help="Lookahead heads; the rest look back. Default heads // 2.")] = None,
    lookback: Annotated[Optional[int], typer.Option(help="Lookback heads; the rest look ahead.")] = None,
    range_: Annotated[
        str, typer.Option("--range", help="local_frame_range k: frames each side a head sees; 'all': T - 1.")
    ] = "2",
    depth: Annotated[int, typer.Option(help="BTT blocks.")] = 4,
    dim: Annotated[Optional[int], typer.Option(help="Head width; default the feature width.")] = None,
    no_context: Annotated[bool, typer.Option("--no-context", help="Drop the start/end context frames.")] = False,
    spatial_embedding: Annotated[
        bool, typer.Option(help="Learned embedding of each token's position in the frame (spool, full, factorized).")
    ] = True,
    correlation: Annotated[
        str,
        typer.Option(help="Local correlation: each token's similarity to the tokens within R rows and columns in "
                          "the frames within --range, as input (spool, full, factorized). 'none': off."),
    ] = "1",
    correlation_token_norm: Annotated[
        bool, typer.Option(help="Standardise each token's correlation over its neighbourhood (see --correlation).")
    ] = True,
    correlation_moments: Annotated[
        bool, typer.Option(help="Also give the correlation times each token's column and row: keeps zoom and rotation.")
    ] = True,
    spatial_range: Annotated[
        str,
        typer.Option(help="Spool head: attention between clip frames only within R rows and columns of a token's "
                          "position. 'all': every position."),
    ] = "all",
    token_pool: Annotated[int, typer.Option(help="Average P x P cached patches at load time.")] = 1,
    norm: Annotated[str, typer.Option(help="mean-linear only: batchnorm | layernorm | none before the linear.")] = "batchnorm",
    temporal_embedding: Annotated[
        bool, typer.Option(help="attentive-probe only: add a learned per-frame embedding (V-JEPA's has none).")
    ] = False,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Clips per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 5e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    warmup: Annotated[float, typer.Option(help="Epochs of linear warm-up before cosine decay.")] = 1.0,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing.")] = 0.0,
    dropout: Annotated[float, typer.Option(help="Dropout in the BTT blocks.")] = 0.0,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm; 0 disables clipping.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for init, shuffling and the split.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Held-out fraction when the store has no split.")] = 0.2,
    val_from_train: Annotated[
        float,
        typer.Option(help="Hold this fraction of the train videos out (stratified) to choose the best epoch on, "
                          "so the reported eval number is not also the one the choice was made on. 0: off."),
    ] = 0.0,
    backend: Annotated[str, typer.Option(help="Attention: auto | flex | blocked | dense.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    cache: Annotated[str, typer.Option(help="auto | none | memory | gpu: hold the features in RAM or GPU memory.")] = "auto",
    workers: Annotated[int, typer.Option(help="Reader threads when features are not cached.")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue from checkpoint_last.pt in --out.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a run in --out that was trained with other options (refused otherwise).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-epoch lines; only the result line.")] = False,
) -> None:
    """Train and evaluate a temporal head on cached features only; writes config, metrics, checkpoints, plots.

    Prints one line per epoch, then the result line: the final epoch's top-1 on the eval split
    (the number to report) and, apart, the best epoch's, with the split it was chosen on.

    Under torchrun (`torchrun --nproc-per-node 8 -m spool train-head ...`) the processes train
    one model with DistributedDataParallel, one GPU each; --batch-size stays the global batch
    and the result equals one process's. Rank 0 writes the outputs."""
    from spool.checkpoint import CheckpointError
    from spool.data import FeatureSetError
    from spool.distributed import torchrun_env
    from spool.stores import StoreError
    from spool.train import NonFiniteLossError, TrainConfig, TrainError
    from spool.train import train_head as run_train_head

    out = out or Path("runs") / f"{store.stem}-{head}"
    rank = torchrun_env()
    try:
        cfg = TrainConfig(
            store=str(store), out=str(out), head=head, num_heads=heads, lookahead=lookahead, lookback=lookback,
            local_frame_range=_range(range_), depth=depth, dim=dim, context_frames=not no_context, dropout=dropout,
            spatial_embedding=spatial_embedding, correlation_range=_int_or(correlation, "none", "--correlation"),
            correlation_token_norm=correlation_token_norm, correlation_moments=correlation_moments,
            spatial_range=_int_or(spatial_range, "all", "--spatial-range"),
            backend=backend, token_pool=token_pool, norm=norm, temporal_embedding=temporal_embedding, epochs=epochs, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, warmup=warmup, label_smoothing=label_smoothing, grad_clip=grad_clip,
            seed=seed, val_fraction=val_fraction, val_from_train=val_from_train, cache=cache, workers=workers,
            device=device, resume=resume, overwrite=overwrite,
        )  # fmt: skip
        result = run_train_head(cfg, progress=not quiet, dist=rank)
    except NonFiniteLossError as err:
        _fail(err, code=1)
    except (ValueError, FileNotFoundError, StoreError, FeatureSetError, TrainError, CheckpointError) as err:
        _fail(err)
    if rank is None or rank.rank == 0:
        console.print(escape(result.result_line()), highlight=False, soft_wrap=True)


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A `spool train-head` run folder (config.json, checkpoints).")],
    source: Annotated[
        Path, typer.Argument(help="Videos as `spool extract` reads them (folder, list file, dataset root), one video "
                                  "file, or a .zarr/.h5 store extracted as the run's was.")
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="predictions.csv or predictions.json; default: a table here.")
    ] = None,
    checkpoint: Annotated[
        str, typer.Option(help="last (the model metrics.json reports as final), best, or a checkpoint path.")
    ] = "last",
    weights: Annotated[
        Optional[str],
        typer.Option(help="Backbone weights file or folder in place of the run's record (its sha256 must match), "
                          "or 'pretrained'. Default: found from the run's record."),
    ] = None,
    store: Annotated[
        Optional[Path], typer.Option(help="Keep the features: extract the videos into this store (resumable), then predict.")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="auto|folder|list|ucf101|hmdb51|kinetics|ssv2.")] = "auto",
    split_file: Annotated[
        Optional[list[Path]], typer.Option("--split-file", help="Official split file(s); repeat the option.")
    ] = None,
    labels_file: Annotated[Optional[Path], typer.Option("--labels-file", help="SSv2 labels JSON or class names.")] = None,
    top_k: Annotated[int, typer.Option(help="Classes listed per video, most likely first.")] = 5,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Frames per backbone call; default: the run's extraction's.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Decoding processes (0: decode inline).")] = 4,
    decode_timeout: Annotated[float, typer.Option(help="Seconds before a video's decoder is killed.")] = 120.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Run a trained head on videos: decode, sample and run the backbone exactly as the run's store
    was extracted (from the run's record), in memory, then the head, averaging clip logits over views.

    Exit 0 when at least one video was predicted, 1 when none was (each failed video gets a row
    with its reason), 2 when the run, the source or an option cannot be used."""
    from spool.backbone import WeightsError
    from spool.checkpoint import CheckpointError
    from spool.data import FeatureSetError
    from spool.predict import PredictConfig, PredictError, run_predict
    from spool.stores import StoreError
    from spool.train import TrainError

    try:
        cfg = PredictConfig(
            run=str(run_dir), source=str(source), out=str(out) if out else None, checkpoint=checkpoint, weights=weights,
            store=str(store) if store else None, format=format, split_files=tuple(str(p) for p in split_file or ()),
            labels_file=str(labels_file) if labels_file else None, top_k=top_k, batch_size=batch_size, workers=workers,
            decode_timeout=decode_timeout, device=device,
        )  # fmt: skip
        result = run_predict(cfg, progress=not quiet, command=_command_line())
    except (ValueError, FileNotFoundError, StoreError, WeightsError, CheckpointError, PredictError, FeatureSetError,
            TrainError) as err:  # fmt: skip
        _fail(err)
    except KeyboardInterrupt:
        where = f"; {store} keeps every finished video, re-run the same command to resume" if store else ""
        console.print(f"[bold red]interrupted[/]{where}")
        raise typer.Exit(130)
    for message in result.run.get("warnings", []):
        warn(message)
    if result.run["random_weights"]:  # said under -q too, as in every output file
        from spool.predict import RANDOM_WARNING

        warn(RANDOM_WARNING)
    if out is None:
        _print_predictions(result, make_console())
    if not quiet or out is None:
        summary = result.summary
        line = f"{summary['predicted']} of {summary['videos']} videos predicted, {summary['failed']} failed"
        if "top1" in summary:
            k = summary["top_k"]
            line += (f"; on the {summary['labeled']} with a label: top-1 {100 * summary['top1']:.1f}%, "
                     f"top-{k['k']} {100 * k['accuracy']:.1f}%")  # fmt: skip
        console.print(line + (f"; written to {out}" if out else ""), highlight=False, soft_wrap=True)
        failed = [p for p in result.predictions if p.status != "ok"]
        for p in failed[:10]:
            console.print(f"  [red]failed[/] {escape(p.video_id)}: {escape(p.error)}", highlight=False, soft_wrap=True)
        if len(failed) > 10:
            console.print(f"  ... {len(failed) - 10} more" + (f" (see {out})" if out else ""))
    if result.predicted == 0:
        console.print("[bold red]error:[/] no video was predicted")
        raise typer.Exit(1)


def _print_predictions(result, out) -> None:
    from rich.table import Table

    table = Table("video", "prediction", "probability", "label", "top-k")
    for p in result.predictions:
        if p.status != "ok":
            table.add_row(p.video_id, "[red]failed[/]", "", p.label or "", p.error)
            continue
        mark = "" if p.correct is None else (" [green]ok[/]" if p.correct else " [red]wrong[/]")
        table.add_row(p.video_id, p.prediction, f"{p.probability:.3f}", (p.label or "") + mark,
                      ", ".join(f"{c} {q:.2f}" for c, q in p.top_k[1:]))  # fmt: skip
    out.print(table)


@app.command()
def ablate(
    grid_file: Annotated[
        Path, typer.Argument(help="Grid YAML: store, out, base, grid, exclude, configs, seeds, baselines (docs/ablate.md).")
    ],
    store: Annotated[Optional[Path], typer.Option(help="Feature store; overrides the file's `store`.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results folder; overrides the file's `out`.")] = None,
    jobs: Annotated[int, typer.Option(help="Runs in parallel processes (one GPU each on a multi-GPU machine).")] = 1,
    cache: Annotated[Optional[str], typer.Option(help="auto | none | memory | gpu; overrides the file's `cache`.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda ...; overrides the file's `device`.")] = None,
    launcher: Annotated[
        Optional[str], typer.Option(help="local (this machine) | submitit (one Slurm job per run); overrides the file's.")
    ] = None,
    cluster: Annotated[
        Optional[str], typer.Option(help="submitit: slurm, or local (jobs as processes here, to try a grid).")
    ] = None,
    partition: Annotated[Optional[str], typer.Option(help="submitit: Slurm partition.")] = None,
    gpus_per_job: Annotated[Optional[int], typer.Option(help="submitit: GPUs per job (default 1).")] = None,
    cpus_per_job: Annotated[Optional[int], typer.Option(help="submitit: CPUs per job, also its torch threads.")] = None,
    time: Annotated[Optional[int], typer.Option("--time", help="submitit: time limit per job, minutes (default 60).")] = None,
    mem_gb: Annotated[Optional[float], typer.Option(help="submitit: memory per job, GB.")] = None,
    account: Annotated[Optional[str], typer.Option(help="submitit: Slurm account.")] = None,
    qos: Annotated[Optional[str], typer.Option(help="submitit: Slurm QOS.")] = None,
    constraint: Annotated[Optional[str], typer.Option(help="submitit: Slurm node constraint (features).")] = None,
    array_parallelism: Annotated[
        Optional[int], typer.Option(help="submitit: at most this many jobs of the array at once.")
    ] = None,
    setup: Annotated[
        Optional[list[str]], typer.Option(help="submitit: shell line run before each job (repeat the option).")
    ] = None,
    slurm_option: Annotated[
        Optional[list[str]], typer.Option(help="submitit: extra sbatch option KEY=VALUE or KEY (repeat the option).")
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="KEY=VALUE: set a train-head option in the file's base, e.g. --set epochs=5 "
                                   "(repeat the option; a value is read as YAML)."),
    ] = None,
    seeds: Annotated[
        Optional[list[int]],
        typer.Option("--seeds", help="Seeds for every cell and baseline; replaces the file's `seeds` (repeat the option)."),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option(help="Train runs recorded as failed again (a re-run keeps them as failed otherwise).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the grid and list its cells; train nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Train a grid of heads on one feature cache. Resumable: re-run to finish what is missing.

    The grid file is validated whole before anything trains: base (train-head options for
    every run), grid (axes whose cartesian product gives the cells), exclude, configs (extra
    cells), seeds, baselines (mean-linear, attentive-probe), launcher. Writes results.csv,
    results.json, summary.md and plots into `out`. With --launcher submitit each run is a
    Slurm job; Ctrl-C leaves them running and a re-run re-attaches to them. Failed runs stay
    failed on a re-run unless --retry-failed. One `spool ablate` at a time per `out`.
    """
    from spool.ablate import print_plan, run_ablation
    from spool.data import FeatureSetError
    from spool.grid import load_grid
    from spool.launcher import LauncherError
    from spool.stores import StoreError
    from spool.train import TrainError

    given = {
        "name": launcher, "cluster": cluster, "partition": partition, "gpus-per-job": gpus_per_job,
        "cpus-per-job": cpus_per_job, "time": time, "mem-gb": mem_gb, "account": account, "qos": qos,
        "constraint": constraint, "array-parallelism": array_parallelism, "setup": setup or None,
        "slurm-options": dict(_key_value(o) for o in slurm_option) if slurm_option else None,
    }  # fmt: skip
    grid = None
    try:
        grid = load_grid(grid_file, store_override=store, out_override=out, cache_override=cache,
                         device_override=device, launcher_override={k: v for k, v in given.items() if v is not None},
                         base_override=dict(_set_option(o) for o in set_ or []), seeds_override=seeds)  # fmt: skip
        result = run_ablation(grid, jobs=jobs, dry_run=dry_run, progress=not quiet, retry_failed=retry_failed)
    except (ValueError, FileNotFoundError, StoreError, FeatureSetError, TrainError, LauncherError) as err:
        _fail(err)
    except KeyboardInterrupt:
        if grid is None or grid.launcher.name == "local":  # submitit's jobs: the launcher said what became of them
            console.print("[bold red]interrupted:[/] finished runs are kept; re-run the same command to resume")
        raise typer.Exit(130)
    if dry_run:
        print_plan(result, make_console())
        return
    if result.failed or result.kept_failed:
        kept = f" ({result.kept_failed} in an earlier invocation, kept as failed: --retry-failed trains them again)"
        console.print(f"[bold red]{result.failed + result.kept_failed} runs failed[/]{kept if result.kept_failed else ''}; "
                      f"see {Path(result.out) / 'results.csv'}")  # fmt: skip
        raise typer.Exit(1)


def _set_option(option: str) -> tuple[str, object]:
    """--set epochs=5 -> ("epochs", 5): the value as YAML reads it, as in the grid file."""
    import yaml

    key, sep, value = option.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"expected KEY=VALUE, got {option!r}", param_hint="--set")
    return key.strip(), yaml.safe_load(value)


def _range(value: str) -> int | str:
    """--range: an integer, or "all" (every frame on a head's side; resolved with the store's T)."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"expected an integer >= 0 or 'all', got {value!r}", param_hint="--range") from None


def _int_or(value: str, word: str, option: str) -> int | None:
    """An integer >= 0, or ``word`` ("none", "all") for None."""
    if value == word:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise typer.BadParameter(f"expected an integer >= 0 or '{word}', got {value!r}", param_hint=option)
    return number


def _key_value(option: str) -> tuple[str, str | bool]:
    """--slurm-option mail-type=END -> ("mail-type", "END"); --slurm-option exclusive -> ("exclusive", True)."""
    key, sep, value = option.partition("=")
    return key.strip(), value if sep else True


@app.command("show-mask")
def show_mask(
    frames: Annotated[int, typer.Option(help="Frames per clip (T).")] = 8,
    range_: Annotated[int, typer.Option("--range", help="local_frame_range k.")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 6,
    lookahead: Annotated[Optional[int], typer.Option(help="Lookahead heads (default heads // 2).")] = None,
    no_context: Annotated[bool, typer.Option("--no-context", help="Without start/end context frames.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {lookback: rows, lookahead: rows} as JSON.")] = False,
) -> None:
    """Draw which frames each head group may attend (rows: query frames C_s, 1..T, C_e)."""
    from spool.mask import mask_json, render_mask

    num_lookahead = heads // 2 if lookahead is None else lookahead
    try:
        if as_json:
            typer.echo(json.dumps(mask_json(frames, range_, heads, num_lookahead, not no_context)))
        else:
            typer.echo(render_mask(frames, range_, heads, num_lookahead, not no_context))
    except ValueError as err:
        _fail(err)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
