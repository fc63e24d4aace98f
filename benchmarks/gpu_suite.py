"""Every GPU claim of Spool in one unattended script: correctness, speed, extraction, head
training and torchrun, each part in its own process under its own time cap.

    python benchmarks/gpu_suite.py --out results/             # on one H200, under 7 minutes
    python benchmarks/gpu_suite.py --out /tmp/s --quick       # smallest sizes; CPU miniatures (CI)
    python benchmarks/gpu_suite.py --out /tmp/s --only attention extraction

Writes OUT/gpu_suite.json (every number), OUT/gpu_suite.md (goals as PASS/FAIL lines, then
each part's tables) and OUT/gpu_suite.log (every part's output). Both reports are rewritten
whenever a part adds a row, so a part that crashes, hangs past its cap or is killed with the
whole command leaves everything measured before it. The suite makes its own inputs
(spool.toy videos, random backbone weights, synthetic stores) and downloads nothing.

Parts (caps on one H200; the whole suite also stops at --budget seconds):
  environment   torch, CUDA, the GPU and the packages the other parts need
  correctness   flex, blocked and dense against a float64 dense reference: outputs and
                gradients, fp32 and bf16, several (T, L, k, head split), context on and off;
                the Spool head (and the full / factorized heads) per backend
  attention     fwd and fwd+bwd of compiled flex, blocked, dense SDPA with the mask and
                unmasked fused SDPA (benchmarks/attention.py), T = 16..256, L = 256, bf16,
                6 heads of 64; TFLOP/s on allowed pairs, peak memory, ratios
  extraction    spool extract against backbone-only on the same decoded frames
                (benchmarks/extract.py), ViT-S/14 and ViT-L/14 at 224, bf16, 12 decode workers
  training      train-head steps/s with --cache gpu and --cache memory, L = 256 and
                --token-pool 2, T = 16; a spool ablate grid against its cells as separate
                processes (benchmarks/ablate.py)
  distributed   torchrun --nproc-per-node 1 extract and train-head (NCCL)

Without CUDA a part runs its CPU miniature under --quick, or says "skipped: no CUDA".
The exit code is 0 whenever the reports were written, whatever the parts found: the
results are in the files. --fail-part / --hang-part make a part raise or hang (tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Heavy imports (torch, spool) happen inside the parts: the parent process only schedules,
# and spool's decode workers (spawned) re-import this file as their __main__.
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # attention.py, extract.py, ablate.py, loader.py


class Skip(Exception):
    """A part (or a row) that cannot run here; the message says why."""


# --- what a part records -----------------------------------------------------------------


class PartLog:
    """One part's results so far, rewritten to its JSON file after every addition, so a part
    stopped at its cap keeps the rows it had."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"status": "running", "info": {}, "notes": [], "tables": {}, "values": {}}
        self.flush()

    def row(self, table: str, **row) -> None:
        self.data["tables"].setdefault(table, []).append(row)
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def value(self, key: str, value) -> None:
        """A number (or bool) that a goal in GOALS is judged on."""
        self.data["values"][key] = value
        self.flush()

    def info(self, **kv) -> None:
        self.data["info"].update(kv)
        self.flush()

    def finish(self, status: str, **fields) -> None:
        self.data.update(status=status, **fields)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def _setup_torch():
    import torch

    # Each new (T, L, dtype, grad mode) compiles flex again; past dynamo's default limit of 8
    # it would fall back to eager flex without a word, and the suite would time the wrong kernel.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    warnings.filterwarnings("ignore", message=".*random weights.*")
    return torch


def _rel(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64; NaN when x holds a NaN or inf."""
    import torch

    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("nan")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _ok(err: float, tol: float) -> bool:
    return err == err and err <= tol  # NaN never passes


def _store_suffix() -> str:
    """zarr (the default format) when installed, else HDF5: the GPU image may lack zarr."""
    try:
        import zarr  # noqa: F401

        return ".zarr"
    except ImportError:
        return ".h5"


def _decoder() -> str:
    try:
        import decord  # noqa: F401

        return "decord"
    except ImportError:
        return "pyav"


# --- part 0: environment -----------------------------------------------------------------


def part_environment(log: PartLog, quick: bool, device: str, work: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    torch = _setup_torch()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpus": os.cpu_count(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"sm_{p.major}{p.minor}",
                    multiprocessors=p.multi_processor_count)  # fmt: skip
    for pkg in ("spool", "timm", "triton", "zarr", "h5py", "av", "decord", "numpy"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    info["store_format"] = _store_suffix()
    info["decoder"] = _decoder()
    log.info(**info)
    for pkg in ("spool", "timm", "av"):
        if info[pkg] is None:
            log.note(f"{pkg} is not installed: the parts that need it will fail (docs/benchmarks.md, 'GPU suite')")


# --- part 1: correctness -----------------------------------------------------------------

# (T, L, k, lookahead heads of 6, context frames): mixed; all-lookback with k > T, no context;
# all-lookahead. Few, since every case compiles flex again (forward and backward).
CORRECTNESS_CASES = [(8, 16, 2, 3, True), (3, 32, 4, 0, False), (16, 64, 1, 6, True)]
CORRECTNESS_CASES_QUICK = [(3, 4, 1, 3, True), (2, 4, 4, 0, False)]
TOLERANCE = {"fp32": 2e-3, "bf16": 2e-2}  # relative to a float64 reference; fp32 allows tf32
# Heads whose attention backends are compared (full and factorized: SDPA whatever the backend).
HEAD_VARIANTS = ("spool", "full", "factorized")


def part_correctness(log: PartLog, quick: bool, device: str, work: Path) -> None:
    torch = _setup_torch()
    from spool.attention import ATTENTION

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    B, H, hd = (1, 6, 8) if quick else (2, 6, 64)
    all_ok = True
    for dname, dtype in dtypes.items():
        for n, (T, L, k, na, context) in enumerate(CORRECTNESS_CASES_QUICK if quick else CORRECTNESS_CASES):
            rule = dict(num_frames=T, num_tokens=L, local_frame_range=k, num_lookahead_heads=na, context_frames=context)
            S = (T + 2 if context else T) * L
            g = torch.Generator().manual_seed(1000 * n + len(dname))  # fresh inputs for every case
            q, k_, v, grad_out = (torch.randn(B, H, S, hd, generator=g, dtype=torch.float64).to(device) for _ in range(4))
            inputs64 = [t.clone().requires_grad_() for t in (q, k_, v)]
            ref = ATTENTION["dense"](*inputs64, **rule)
            ref_grads = torch.autograd.grad(ref, inputs64, grad_out)
            for backend in ("flex", "blocked", "dense"):
                trains = not (backend == "flex" and device != "cuda")  # flex has no CPU backward
                row = dict(dtype=dname, T=T, L=L, k=k, lookahead=na, context=context, backend=backend)
                try:
                    xs = [t.to(dtype).requires_grad_(trains) for t in (q, k_, v)]
                    with torch.set_grad_enabled(trains):
                        out = ATTENTION[backend](*xs, **rule)
                    row["out_err"] = _rel(out, ref)
                    if trains:
                        grads = torch.autograd.grad(out, xs, grad_out.to(dtype))
                        row["grad_err"] = max(_rel(a, b) for a, b in zip(grads, ref_grads))
                    else:
                        row["grad_err"] = "no CPU backward"
                    errs = [row["out_err"]] + ([row["grad_err"]] if trains else [])
                    row["ok"] = all(_ok(e, TOLERANCE[dname]) for e in errs)
                except Exception as err:  # one row's failure is a result, not the end of the part
                    row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
                all_ok &= row["ok"]
                log.row("backends against float64 dense", **row)
    log.note(f"tolerance on ||x - ref|| / ||ref||: {TOLERANCE}; B={B}, {H} heads of {hd}")
    all_ok &= _check_heads(log, quick, device)
    bad = sum(not r.get("ok", True) for rows in log.data["tables"].values() for r in rows)
    log.note(f"{bad} row(s) out of tolerance or failed" if bad else "every row within tolerance")
    log.value("backends_agree", all_ok)


def _check_heads(log: PartLog, quick: bool, device: str) -> bool:
    """Each head with an attention backend, built with the same weights per backend: logits and
    parameter gradients against the dense backend in float64."""
    import dataclasses

    import torch

    from spool.checkpoint import HEADS, build_head

    T, L, D, C = (3, 4, 24, 5) if quick else (8, 64, 384, 10)
    common = dict(in_dim=D, num_frames=T, num_tokens=L, num_classes=C, dim=D, depth=2, num_heads=6,
                  num_lookahead_heads=3, local_frame_range=2)  # fmt: skip
    x = torch.randn(4, T, L, D, generator=torch.Generator().manual_seed(7)).to(device)
    y = torch.arange(4, device=device) % C
    all_ok = True
    for name in HEAD_VARIANTS:
        if name not in HEADS:
            log.row("heads", head=name, status="not present")
            continue
        config_cls = HEADS[name][1]
        fields = {f.name for f in dataclasses.fields(config_cls)}
        if "backend" not in fields:
            log.row("heads", head=name, status="no backend option: nothing to compare")
            continue

        def run(backend, dtype, autocast):
            torch.manual_seed(0)  # the same weights for every backend
            # "full" and "factorized" are Spool heads with another attention: they take the
            # backend option but use none (SDPA, no mask), so every backend must agree there
            attention = {"attention": name} if "attention" in fields else {}
            cfg = config_cls(**{k: v for k, v in common.items() if k in fields}, backend=backend, **attention)
            model = build_head(name, cfg, device=device).to(dtype)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x.to(dtype))
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
            return logits, torch.cat([g.flatten() for g in grads])

        ref_logits, ref_grads = run("dense", torch.float64, False)
        for mode, autocast in (("fp32", False), ("bf16 autocast", True)) if device == "cuda" else (("fp32", False),):
            for backend in ("flex", "blocked", "dense"):
                if backend == "flex" and device != "cuda":
                    log.row("heads", head=name, mode=mode, backend=backend, status="no CPU backward")
                    continue
                row = dict(head=name, mode=mode, backend=backend)
                try:
                    logits, grads = run(backend, torch.float32, autocast)
                    row.update(logits_err=_rel(logits, ref_logits), grad_err=_rel(grads, ref_grads))
                    tol = 5e-2 if autocast else TOLERANCE["fp32"]
                    row["ok"] = _ok(row["logits_err"], tol) and _ok(row["grad_err"], tol)
                except Exception as err:
                    row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
                all_ok &= row["ok"]
                log.row("heads", **row)
    return all_ok


# --- part 2: attention speed --------------------------------------------------------------

SPEED_BACKENDS = ("flex", "blocked", "dense", "sdpa-full")


def part_attention(log: PartLog, quick: bool, device: str, work: Path) -> None:
    torch = _setup_torch()
    from attention import estimate_peak_bytes, measure

    cuda = device == "cuda"
    a = argparse.Namespace(
        device=device, dtype="bf16" if cuda else "fp32", L=8 if quick else 256, dim=48 if quick else 384, heads=6,
        lookahead=3, k=2, batch=1 if quick else 2, warmup=1 if quick else 3, repeats=2 if quick else 10,
    )  # fmt: skip
    Ts = [2, 4] if quick else [16, 32, 64, 128, 256]
    # Dense keeps an (H, S, S) mask and (B, H, S, S) scores: past this estimate it is not run.
    limit_gb = 0.7 * torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else 2.0
    log.note(f"B={a.batch}, L={a.L}, {a.heads} heads of {a.dim // a.heads} (lookahead {a.lookahead}), k={a.k}, "
             f"{a.dtype}; medians of {a.repeats} after {a.warmup} warm-up; memory limit {limit_gb:.0f} GB")  # fmt: skip
    rows = {}
    for T in Ts:
        for backend in SPEED_BACKENDS:
            row = {"T": T, "S": (T + 2) * a.L, "backend": backend}
            est = estimate_peak_bytes(backend, T, a, device) / 1e9
            try:
                if est > limit_gb:
                    raise Skip(f"est. {est:.0f} GB > {limit_gb:.0f} GB")
                r = measure(backend, T, a)
                row.update({k: r.get(k) for k in ("fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops", "peak_gb")})
                rows[backend, T] = row
            except Skip as why:
                row["skipped"] = str(why)
            except Exception as err:  # out of memory, a compile error: recorded, the next row runs
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            log.row("times", **row)

    def t(backend, T, key="fwd_bwd_ms"):
        return (rows.get((backend, T)) or {}).get(key)

    for T in Ts:
        flex, dense, blocked = t("flex", T), t("dense", T), t("blocked", T)
        full_rate, flex_rate = t("sdpa-full", T, "fwd_bwd_tflops"), t("flex", T, "fwd_bwd_tflops")
        log.row("ratios (fwd+bwd)", T=T,
                dense_over_flex=dense / flex if dense and flex else None,
                blocked_over_flex=blocked / flex if blocked and flex else None,
                flex_tflops_over_full=flex_rate / full_rate if flex_rate and full_rate else None)  # fmt: skip
    if t("flex", 32) and t("dense", 32):
        log.value("flex_vs_dense_T32", t("dense", 32) / t("flex", 32))
    if t("flex", 32, "fwd_bwd_tflops") and t("sdpa-full", 32, "fwd_bwd_tflops"):
        log.value("flex_vs_full_tflops_T32", t("flex", 32, "fwd_bwd_tflops") / t("sdpa-full", 32, "fwd_bwd_tflops"))
    if t("flex", 256) and t("flex", 32):
        log.value("flex_T256_over_T32", t("flex", 256) / t("flex", 32))
    if t("blocked", 256) and t("blocked", 32):
        log.note(f"blocked fwd+bwd time(T=256)/time(T=32): {t('blocked', 256) / t('blocked', 32):.2f}")
    log.note("linear cost in T would give time(T=256)/time(T=32) = 258/34 = 7.6 (context frames included)")


# --- part 3: extraction ---------------------------------------------------------------------


def part_extraction(log: PartLog, quick: bool, device: str, work: Path) -> None:
    torch = _setup_torch()
    from extract import backbone_fps, decoded_frames

    from spool.backbone import load_backbone
    from spool.extract import ExtractConfig, run_extract
    from spool.sources import load_source
    from spool.toy import make_toy

    if quick:
        backbones, size, T, per_class, video_frames, video_size, batch, workers = ["dinov2_vits14"], 28, 4, 1, 8, 32, 8, 0
        extract_s, max_videos = 0.0, 12
    else:
        backbones, size, T, per_class, video_frames, video_size, batch, workers = (
            ["dinov2_vits14", "dinov2_vitl14"], 224, 16, 4, 48, 256, 64, 12)  # fmt: skip
        extract_s, max_videos = 6.0, 1000  # a ViT-L store of 1000 videos is 8 GB
    decoder, suffix, dev = _decoder(), _store_suffix(), torch.device(device)
    make_toy(work / "toy", videos_per_class=per_class, num_frames=video_frames, size=video_size, seed=0)
    distinct = [e.path for e in load_source(work / "toy").entries]
    frames = decoded_frames(distinct, frames=T, size=size, decoder=decoder)
    log.note(f"{len(distinct)} distinct spool.toy videos ({video_frames} frames of {video_size} px, lossless H.264), "
             f"linked many times over; T={T}, batch {batch}, {workers} decode workers ({decoder}), store {suffix}; "
             "steady = frames/s after the first fifth of the videos (worker start-up and warm-up left out)")  # fmt: skip
    for name in backbones:
        encoder, _ = load_backbone(name, weights="random", image_size=size)
        encoder = encoder.to(dev)
        probe = backbone_fps(encoder, frames, batch, dev)
        backbone = backbone_fps(encoder, frames, batch, dev, min_frames=int(probe * (3.0 if not quick else 0)))
        del encoder
        n_videos = max(len(distinct), min(max_videos, int(backbone * extract_s / T)))
        source = work / f"src-{name}"
        for i in range(n_videos):  # the same files under new names: decoding is done per video all the same
            real = distinct[i % len(distinct)]
            link = source / real.parent.name / f"{i:05d}{real.suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(real)
        written: list[float] = []
        cfg = ExtractConfig(source=str(source), out=str(work / f"{name}{suffix}"), backbone=name, weights="random",
                            image_size=size, frames=T, workers=workers, batch_size=batch, device=device, decoder=decoder)  # fmt: skip
        result = run_extract(cfg, progress=False, on_video_written=lambda v: written.append(time.perf_counter()))
        first = len(written) // 5
        steady = (len(written) - 1 - first) * T / (written[-1] - written[first]) if len(written) > first + 1 else None
        run_fps = result.frames / result.seconds
        log.row("frames/s", backbone=name, size=size, videos=result.done, failed=result.failed,
                backbone_only=backbone, extract_run=run_fps, extract_steady=steady,
                ratio_run=run_fps / backbone, ratio_steady=steady / backbone if steady else None)  # fmt: skip
        key = {"dinov2_vits14": "extract_vits14", "dinov2_vitl14": "extract_vitl14"}[name]
        if steady:
            log.value(key, steady / backbone)
        for p in work.glob(f"{name}{suffix}*"):  # a ViT-L store of a few thousand videos is GBs
            _remove(p)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- part 4: head training -------------------------------------------------------------------


def part_training(log: PartLog, quick: bool, device: str, work: Path) -> None:
    _setup_torch()
    from ablate import grid_dict, run_in_process, run_processes
    from loader import write_store

    from spool.train import TrainConfig, train_head

    # --quick: one epoch of a one-block head, one grid cell: the code paths, not the numbers.
    clips, T, L, D, classes, batch, epochs, depth = (30, 4, 16, 48, 3, 8, 1, 1) if quick else (384, 16, 256, 384, 10, 32, 3, 4)
    store = work / f"synthetic{_store_suffix()}"
    t0 = time.perf_counter()
    write_store(store, clips, T, L, D, num_classes=classes)
    log.note(f"synthetic store: {clips} clips of T={T}, L={L}, D={D} ({time.perf_counter() - t0:.1f} s to write); "
             f"head depth {depth}, 6 heads, width {D}, batch {batch}, {epochs} epochs; steady = median clips/s "
             "of the epochs after the first (compilation and warm-up are in the first); steps/s = clips/s / batch")  # fmt: skip
    rates = {}
    for pool in (1, 2):
        for cache in ("memory", "gpu"):
            row = {"token_pool": pool, "L": L // pool**2, "cache": cache}
            if cache == "gpu" and device != "cuda":
                log.row("train-head", **row, skipped="no CUDA")
                continue
            cfg = TrainConfig(store=str(store), out=str(work / f"run-p{pool}-{cache}"), epochs=epochs, batch_size=batch,
                              cache=cache, token_pool=pool, device=device, workers=2, depth=depth)  # fmt: skip
            t0 = time.perf_counter()
            result = train_head(cfg, progress=False)
            per_epoch = [h.clips_per_s for h in result.history]
            steady = statistics.median(per_epoch[1:] or per_epoch)
            rates[pool, cache] = steady
            log.row("train-head", **row, first_epoch_clips_s=per_epoch[0], steady_clips_s=steady,
                    steady_steps_s=steady / batch, wall_s=time.perf_counter() - t0)  # fmt: skip
        if (pool, "gpu") in rates:
            log.row("gpu over memory", token_pool=pool, ratio=rates[pool, "gpu"] / rates[pool, "memory"])
    if (1, "gpu") in rates:
        log.value("cache_gpu_vs_memory", rates[1, "gpu"] / rates[1, "memory"])

    args = argparse.Namespace(epochs=1 if quick else 2, dim=D, batch_size=batch)
    grid = grid_dict(store, work / "ablation", args, grid={"lookahead": [3] if quick else [0, 3]}, device=device)
    ablate_s, result = run_in_process(grid)
    processes_s = run_processes(result, work / "processes", device=device)
    log.row("ablate", cells=len(result.runs), epochs=args.epochs, depth=2, ablate_in_process_s=ablate_s,
            separate_processes_s=processes_s, processes_over_ablate=processes_s / ablate_s)  # fmt: skip


# --- part 5: distributed smoke --------------------------------------------------------------


def part_distributed(log: PartLog, quick: bool, device: str, work: Path) -> None:
    from spool.stores import open_store
    from spool.stores.base import DONE
    from spool.toy import make_toy

    make_toy(work / "toy", videos_per_class=2, num_frames=16, size=64, seed=0)
    store, out = work / f"ddp{_store_suffix()}", work / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "spool"]
    commands = {
        "extract": ["extract", str(work / "toy"), "--out", str(store), "--weights", "random", "--size", "56",
                    "--frames", "8", "--device", device, "--workers", "2", "--decoder", _decoder(), "-q"],
        "train-head": ["train-head", str(store), "--out", str(out), "--epochs", "2", "--depth", "1", "--dim", "64",
                       "--heads", "2", "--batch-size", "4", "--val-fraction", "0.5", "--device", device, "-q"],
    }  # fmt: skip
    ok = True
    for name, argv in commands.items():
        t0 = time.perf_counter()
        run = subprocess.run(torchrun + argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        row = {"command": f"torchrun --nproc-per-node 1 -m spool {name}", "exit_code": run.returncode,
               "wall_s": time.perf_counter() - t0}  # fmt: skip
        if run.returncode != 0:
            row["error"] = _error_line(run.stdout + run.stderr)
            ok = False
        log.row("torchrun", **row)
        if not ok:
            break
    if ok:
        with open_store(store) as s:
            done = int((s.videos().status == DONE).sum())
            log.note(f"store: {s.num_videos} videos, {done} done")
            ok &= done == s.num_videos
        config = json.loads((out / "config.json").read_text())
        log.note(f"train-head config.json: world_size {config['world_size']}, device {config['device']}")
        ok &= config["world_size"] == 1 and (out / "metrics.json").exists()
    log.value("torchrun_nccl", ok)


def _error_line(output: str) -> str:
    """The line of a failed command's output that names its error, not torchrun's trailer."""
    lines = [x.strip() for x in output.splitlines() if x.strip()]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error)\b", line) and not re.search(r"ChildFailedError|elastic|error_file", line):
            return line[-400:]
    return " | ".join(lines[-3:])[-400:]


# --- the parts and the goals -----------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    run: Callable[[PartLog, bool, str, Path], None]
    cap_s: float  # on one H200; the caps add up to the 7-minute budget
    quick_cap_s: float  # --quick, also on two loaded CPU cores
    cpu_miniature: bool  # without CUDA, --quick runs it small on the CPU
    needs_cuda: bool = True


PARTS = [
    Part("environment", "Environment", part_environment, 15, 60, True, needs_cuda=False),
    Part("correctness", "1. Correctness on CUDA", part_correctness, 70, 120, True),
    Part("attention", "2. Attention speed", part_attention, 105, 120, True),
    Part("extraction", "3. Extraction", part_extraction, 85, 120, True),
    Part("training", "4. Head training", part_training, 95, 150, True),
    Part("distributed", "5. Distributed smoke (torchrun, NCCL)", part_distributed, 50, 60, False),
]
PART_BY_NAME = {p.name: p for p in PARTS}


@dataclass(frozen=True)
class Goal:
    key: str  # PartLog.value key
    part: str
    text: str
    op: str  # ">=", "<=", "is"
    target: Any


GOALS = [
    Goal("backends_agree", "correctness", "flex, blocked and dense agree with float64 dense (outputs, gradients)", "is", True),
    Goal("flex_vs_dense_T32", "attention", "flex fwd+bwd speed-up over dense SDPA with the mask, T=32", ">=", 5.0),
    Goal("flex_vs_full_tflops_T32", "attention", "flex fwd+bwd TFLOP/s on allowed pairs / unmasked fused SDPA's, T=32", ">=", 0.5),
    Goal("flex_T256_over_T32", "attention", "flex fwd+bwd time(T=256) / time(T=32), k=2", "<=", 9.0),
    Goal("extract_vits14", "extraction", "spool extract / backbone-only frames/s, ViT-S/14 at 224", ">=", 0.9),
    Goal("extract_vitl14", "extraction", "spool extract / backbone-only frames/s, ViT-L/14 at 224", ">=", 0.9),
    Goal("cache_gpu_vs_memory", "training", "--cache gpu / --cache memory head steps/s, L=256, T=16", ">=", 1.5),
    Goal("torchrun_nccl", "distributed", "torchrun --nproc-per-node 1 extract and train-head (NCCL)", "is", True),
]


def judge(goal: Goal, part: dict, quick: bool) -> dict:
    value = part.get("values", {}).get(goal.key)
    row = {"goal": goal.text, "target": f"{goal.op} {goal.target}", "measured": value, "part": goal.part}
    if quick:
        return {**row, "result": "NOT JUDGED", "why": "--quick sizes"}
    if value is None:
        status = part["status"]
        why = part.get("reason") or part.get("error") or ("its rows do not give it" if status == "ok" else "")
        return {**row, "result": "NOT MEASURED", "why": f"{goal.part} {status}" + (f": {why}" if why else "")}
    passed = value is goal.target if goal.op == "is" else value >= goal.target if goal.op == ">=" else value <= goal.target
    return {**row, "result": "PASS" if passed else "FAIL"}


# --- the child: one part in this process ---------------------------------------------------------


def run_part(args) -> int:
    part = PART_BY_NAME[args.part]
    log = PartLog(Path(args.part_json))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if part.name in args.hang_part:
            time.sleep(10**6)  # test hook: a part that never returns, for the watchdog
        if part.name in args.fail_part:
            raise RuntimeError(f"injected failure (--fail-part {part.name})")
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and part.needs_cuda and not (args.quick and part.cpu_miniature):
            raise Skip("no CUDA" + (" (--quick runs its CPU miniature)" if part.cpu_miniature else ""))
        log.info(device=device)
        part.run(log, args.quick, device, work)
        log.finish("ok")
    except Skip as why:
        log.finish("skipped", reason=str(why))
    except BaseException as err:
        log.finish("failed", error=f"{type(err).__name__}: {err}"[:500], traceback=traceback.format_exc()[-3000:])
        traceback.print_exc()
        return 1
    return 0


# --- the parent: schedule the parts, keep the reports current --------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    run = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if run.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(BENCH), "status", "--porcelain"], capture_output=True, text=True).stdout
    return run.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a part and everything it started (its own process group, made at start)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, offset: int, lines: int = 25) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


def run_child(part: Part, cap: float, args, work: Path, log_path: Path, entry: dict, save: Callable[[], None]) -> None:
    part_json = work / f"{part.name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--part-json", str(part_json),
           "--work", str(work / part.name), *(["--quick"] if args.quick else []),
           *[f"--fail-part={p}" for p in args.fail_part], *[f"--hang-part={p}" for p in args.hang_part]]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as logf:
        logf.write(f"\n===== {part.name} ({_now()}, cap {cap:.0f} s) =====\n".encode())
        logf.flush()
        offset = logf.tell()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=BENCH.parent)
        seen, timed_out = None, False
        try:
            while True:
                try:
                    rc = proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() - t0 > cap:
                    _stop(proc)
                    rc, timed_out = proc.returncode, True
                    break
                mtime = part_json.stat().st_mtime if part_json.exists() else None
                if mtime != seen:  # the part added a row: put it in the reports now
                    seen = mtime
                    _merge(entry, part_json)
                    entry["seconds"] = round(time.monotonic() - t0, 1)
                    save()
        except BaseException:  # Ctrl-C: the part runs in its own session and would not see it
            _stop(proc)
            raise
    entry["seconds"] = round(time.monotonic() - t0, 1)
    _merge(entry, part_json)
    if timed_out:
        entry.update(status="timeout", reason=f"stopped at its {cap:.0f} s cap; rows measured before are kept")
    elif entry["status"] in ("pending", "running"):
        entry.update(status="failed", reason=f"exit code {rc} without a result (killed, or crashed in native code)")
    if entry["status"] in ("failed", "timeout"):
        entry["log_tail"] = _tail(log_path, offset)


def _merge(entry: dict, part_json: Path) -> None:
    try:
        entry.update(json.loads(part_json.read_text()))
    except (OSError, ValueError):
        pass  # not written yet


def new_report(args, argv: list[str]) -> dict:
    return {
        "suite": {"command": "python benchmarks/gpu_suite.py " + " ".join(argv), "mode": "quick" if args.quick else "full",
                  "started": _now(), "finished": None, "budget_s": args.budget, "git": _git_commit()},  # fmt: skip
        "parts": [{"name": p.name, "title": p.title, "status": "pending", "seconds": None} for p in PARTS],
        "goals": [],
    }


def write_report(out: Path, report: dict, quick: bool) -> None:
    parts = {p["name"]: p for p in report["parts"]}
    report["goals"] = [judge(g, parts[g.part], quick) for g in GOALS]
    for name, text in (("gpu_suite.json", json.dumps(report, indent=2, default=str)), ("gpu_suite.md", render_markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out / name)


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != x:
            return "NaN"
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"
    return str(x).replace("|", "/").replace("\n", " ")


def md_table(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]


def render_markdown(report: dict) -> str:
    s = report["suite"]
    env = next(p for p in report["parts"] if p["name"] == "environment").get("info", {})
    lines = ["# Spool GPU suite", "", f"- command: `{s['command']}` ({s['mode']})",
             f"- started {s['started']}, finished {s['finished'] or '(still running, or stopped)'}; git {s['git']}"]  # fmt: skip
    if env:
        lines.append("- machine: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines += ["", "## Goals", ""]
    lines += md_table([{"result": g["result"], "goal": g["goal"], "target": g["target"], "measured": g["measured"],
                        "why": g.get("why", "")} for g in report["goals"]])  # fmt: skip
    lines += ["", "## Parts", ""]
    lines += md_table([{"part": p["title"], "status": p["status"], "seconds": p.get("seconds"), "cap_s": p.get("cap_s"),
                        "reason": p.get("reason") or p.get("error") or ""} for p in report["parts"]])  # fmt: skip
    for p in report["parts"]:
        head = f"{p['status']}" + (f": {p['reason']}" if p.get("reason") else "")
        lines += ["", f"## {p['title']}: {head}", ""]
        if p.get("error"):
            lines += [f"Error: `{fmt(p['error'])}`", ""]
        lines += [f"- {n}" for n in p.get("notes", [])]
        for title, rows in p.get("tables", {}).items():
            lines += ["", f"### {title}", "", *md_table(rows)]
        if p.get("log_tail"):
            lines += ["", "Last lines of its output (gpu_suite.log):", "", "```", p["log_tail"], "```"]
    return "\n".join(lines)


def run_suite(args, argv: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_suite.log"
    log_path.write_text("")
    report = new_report(args, argv)
    save = lambda: write_report(out, report, args.quick)  # noqa: E731
    save()
    deadline = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="spool-gpu-suite-") as tmp:
        work = Path(tmp)
        for part, entry in zip(PARTS, report["parts"]):
            left = deadline - time.monotonic()
            cap = min(dict(args.cap).get(part.name, part.quick_cap_s if args.quick else part.cap_s), left)
            entry["cap_s"] = round(cap)
            if args.only and part.name not in args.only and part.name != "environment":
                entry.update(status="skipped", reason="not selected (--only)")
            elif left < 5:
                entry.update(status="skipped", reason=f"the suite's --budget of {args.budget:.0f} s is spent")
            else:
                print(f"gpu_suite: {part.name} (cap {cap:.0f} s) ...", flush=True)
                run_child(part, cap, args, work, log_path, entry, save)
                print(f"gpu_suite: {part.name}: {entry['status']} in {entry['seconds']} s"
                      + (f" ({entry.get('reason') or entry.get('error')})" if entry["status"] != "ok" else ""), flush=True)  # fmt: skip
            save()
    report["suite"]["finished"] = _now()
    save()
    for g in report["goals"]:
        print(f"{g['result']:>12}  {g['goal']}: {fmt(g['measured'])} (target {g['target']})")
    print(f"gpu_suite: wrote {out / 'gpu_suite.md'} and {out / 'gpu_suite.json'}")
    return 0


def _cap(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in PART_BY_NAME or not seconds.replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected PART=SECONDS with PART one of {', '.join(PART_BY_NAME)}")
    return name, float(seconds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for gpu_suite.json, gpu_suite.md and gpu_suite.log")
    ap.add_argument("--quick", action="store_true", help="each part at its smallest size; CPU miniatures without CUDA")
    ap.add_argument("--only", nargs="+", default=[], choices=list(PART_BY_NAME), help="run these parts (and environment)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole suite (default: 7 minutes)")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", type=_cap,
                    help="another time cap for one part (repeatable)")
    ap.add_argument("--fail-part", action="append", default=[], choices=list(PART_BY_NAME), help=argparse.SUPPRESS)
    ap.add_argument("--hang-part", action="append", default=[], choices=list(PART_BY_NAME), help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=list(PART_BY_NAME), help=argparse.SUPPRESS)  # child process
    ap.add_argument("--part-json", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        return run_part(args)
    if not args.out:
        ap.error("--out DIR is required")
    return run_suite(args, argv)


if __name__ == "__main__":
    sys.exit(main())
