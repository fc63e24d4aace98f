"""The `spool` command. Each command parses its options into a config and calls one library function."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="spool",
    help="Feature cache and temporal heads on frozen video foundation-model features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _fail(err: Exception, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {err}")
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
    backbone: Annotated[str, typer.Option(help="dinov2_vit{s,b,l,g}14[_reg] or any timm ViT name.")] = "dinov2_vits14",
    weights: Annotated[
        str, typer.Option(help="'pretrained' (timm hub cache), a .pth/.safetensors path, or 'random' (tests only).")
    ] = "pretrained",
    size: Annotated[int, typer.Option(help="Shorter side resize, then centre crop to size x size.")] = 224,
    token_pool: Annotated[int, typer.Option(help="Average P x P patches before writing.")] = 1,
    frames: Annotated[int, typer.Option(help="Frames per clip (T).")] = 16,
    stride: Annotated[Optional[int], typer.Option(help="Fixed frame step; default: T frames spread over the video.")] = None,
    clips: Annotated[int, typer.Option(help="Temporal views per video.")] = 1,
    decoder: Annotated[str, typer.Option(help="decord (PyAV as fallback) or pyav.")] = "decord",
    workers: Annotated[int, typer.Option(help="Decoding processes (0: decode inline).")] = 4,
    decode_timeout: Annotated[float, typer.Option(help="Seconds before a video's decoder is killed.")] = 120.0,
    batch_size: Annotated[int, typer.Option(help="Frames per backbone call.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for --weights random.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store made with other options.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Try videos recorded as failed again.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Decode each video once, run the frozen backbone, write per-frame patch tokens. Re-run to resume."""
    from spool.backbone import WeightsError
    from spool.extract import ExtractConfig, run_extract
    from spool.stores import StoreError

    try:
        cfg = ExtractConfig(
            source=str(source), out=str(out), format=format,
            split_files=tuple(str(p) for p in split_file or ()),
            labels_file=str(labels_file) if labels_file else None,
            backbone=backbone, weights=weights, image_size=size, token_pool=token_pool, frames=frames,
            stride=stride, clips=clips, decoder=decoder, workers=workers, decode_timeout=decode_timeout,
            batch_size=batch_size, device=device, seed=seed, overwrite=overwrite, retry_failed=retry_failed,
        )  # fmt: skip
        result = run_extract(cfg, command=_command_line(), progress=not quiet)
    except (ValueError, FileNotFoundError, StoreError, WeightsError) as err:
        _fail(err)
    if not quiet:
        console.print(
            f"{out}: {result.done} extracted, {result.failed} failed, {result.skipped} already done "
            f"({result.videos_per_s:.1f} videos/s, {result.frames_per_s:.0f} frames/s)"
        )
        for video_id, reason in result.failures[:10]:
            console.print(f"  [red]failed[/] {video_id}: {reason}")
        if result.missing:
            shown = ", ".join(result.missing[:5])
            console.print(f"  [yellow]{len(result.missing)} listed videos are not on disk[/] (skipped), e.g. {shown}")
        if len(result.failures) > 10:
            console.print(f"  ... {len(result.failures) - 10} more; see `spool info {out}`")
    if result.total_done == 0:
        console.print("[bold red]error:[/] no video was extracted")
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
        _print_summary(summary, Console())


def _print_summary(summary: dict, out: Console) -> None:
    from rich.table import Table

    attrs = summary["attrs"]
    t, l, d = summary["clip_shape"]
    weights = attrs.get("weights", {})
    out.print(f"[bold]{summary['path']}[/]  schema v{attrs.get('schema_version')}, spool {attrs.get('spool_version')}")
    out.print(
        f"backbone {attrs.get('backbone')} ({weights.get('source')}, pretrained={weights.get('pretrained')}), "
        f"image {attrs.get('image_size')} px, patch {attrs.get('patch_size')}, token pool {attrs.get('token_pool')}"
    )
    out.print(f"clips (T, L, D) = ({t}, {l}, {d}), sampling {attrs.get('sampling')}")
    out.print(f"videos {summary['num_videos']}: {summary['status']}; {summary['done_clips']} clips with features")
    out.print(f"on disk {summary['bytes_on_disk'] / 2**20:.1f} MiB")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
