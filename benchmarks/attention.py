"""Time and memory of the three attention backends on Spool-shaped inputs.

    python benchmarks/attention.py --T 16 32 128 --repeats 3            # CPU, a few minutes
    python benchmarks/attention.py --device cuda --dtype bf16           # GPU, all T

Inputs are q, k, v of shape (B, H, S, hd), S = (T + 2) * L (context frames on), as one
BTT block sees them. Times are medians of --repeats runs after --warmup runs: "fwd" under
no_grad, "fwd+bwd" a forward and a backward of out.sum()-like gradients.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above the inputs. On CPU each
(backend, T) runs in a fresh child process and reports the peak resident set size above
the inputs (Linux VmHWM after resetting it through /proc/self/clear_refs); tracemalloc does
not see torch's allocations. The CPU flex forward is the eager, unfused kernel, which
materialises the full (B, H, S, S) score matrix, and flex has no CPU backward.

Dense materialises (H, S, S) masks and (B, H, S, S) scores; a backend whose estimated peak
exceeds --mem-limit-gb is printed as "skipped (memory)" instead of being run.

TFLOP/s (CUDA) counts only allowed query-key pairs: 4 * hd flops per pair forward
(QK^T and PV), 3.5x that for forward+backward (the FlashAttention convention).

``--backends sdpa-full`` adds the full-attention reference: fused SDPA without a mask over
the same S tokens (every pair allowed), the rate the masked backends are held against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from spool.attention import ATTENTION
from spool.mask import frame_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def full_attention(q, k, v, **rule):
    """Unmasked fused SDPA over all S tokens: the full-attention speed reference, not Spool's rule."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


# The three backends of Spool's rule, and the reference they are timed against.
TIMED = {**ATTENTION, "sdpa-full": full_attention}


def allowed_pairs(T, L, k, heads, lookahead_heads, backend="flex"):
    """Allowed (query, key) token pairs summed over heads, from the frame-level rule
    (sdpa-full: every pair of the S = (T + 2) * L tokens)."""
    if backend == "sdpa-full":
        return heads * ((T + 2) * L) ** 2
    per_group = [frame_mask(T, k, la).sum().item() * L * L for la in (False, True)]
    return (heads - lookahead_heads) * per_group[0] + lookahead_heads * per_group[1]


def estimate_peak_bytes(backend, T, a, device):
    """Rough peak bytes of one forward+backward, to skip runs that would not fit."""
    S = (T + 2) * a.L
    elem = torch.tensor([], dtype=DTYPES[a.dtype]).element_size()
    scores = a.batch * a.heads * S * S * 4  # float32 scores on the math path
    if backend == "sdpa-full":
        return 0  # fused kernels keep no score matrix
    if backend == "dense":
        # Measured on CPU at T=8, 16: about 3.1x the float32 score matrix plus the bool mask.
        mask = a.heads * S * S
        return (3.2 * scores if device == "cpu" else elem / 4 * scores) + mask
    if backend == "flex":
        return 3.6 * scores if device == "cpu" else 0  # CPU: unfused forward, measured 3.5x at T=16
    W = a.k + 2
    return 12 * a.batch * a.heads * T * W * a.L * (a.dim // a.heads) * elem  # gathered K/V windows and grads


def _rss_gb(field, path="/proc/self/status"):
    with open(path) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1e6
    return float("nan")


def mem_available_gb():
    """MemAvailable on Linux (other processes share this machine), else infinity."""
    try:
        return _rss_gb("MemAvailable", "/proc/meminfo")
    except OSError:
        return float("inf")


def _time_ms(fn, device):
    """One call's time in ms: CUDA events on the GPU (no host round trip in the interval),
    the host clock around a synchronised call elsewhere."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(backend, T, a):
    """Run one (backend, T): median times in ms and peak memory in GB above the inputs."""
    device, dtype = a.device, DTYPES[a.dtype]
    S, hd = (T + 2) * a.L, a.dim // a.heads
    rule = dict(
        num_frames=T, num_tokens=a.L, local_frame_range=a.k, num_lookahead_heads=a.lookahead, context_frames=True
    )
    attend = TIMED[backend]
    g = torch.Generator(device="cpu").manual_seed(T)
    q, k, v = (torch.randn(a.batch, a.heads, S, hd, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad_out = torch.randn(q.shape, generator=g).to(device, dtype)

    def fwd():
        with torch.no_grad():
            attend(q, k, v, **rule)

    def fwd_bwd():
        out = attend(q, k, v, **rule)
        torch.autograd.backward(out, grad_out)
        q.grad = k.grad = v.grad = None

    can_train = not (backend == "flex" and device != "cuda")  # flex has no CPU backward
    result = {"backend": backend, "T": T, "S": S}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
        except OSError:
            pass
        base = _rss_gb("VmRSS")
    for name, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd if can_train else None)):
        if fn is None:
            result[name] = None
            continue
        for _ in range(a.warmup):
            fn()
        result[name] = statistics.median(_time_ms(fn, device) for _ in range(a.repeats))
    if device == "cuda":
        result["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        pairs = allowed_pairs(T, a.L, a.k, a.heads, a.lookahead, backend)
        flops = 4 * hd * pairs * a.batch
        result["fwd_tflops"] = flops / (result["fwd_ms"] * 1e-3) / 1e12
        if result["fwd_bwd_ms"]:
            result["fwd_bwd_tflops"] = 3.5 * flops / (result["fwd_bwd_ms"] * 1e-3) / 1e12
    else:
        result["peak_gb"] = _rss_gb("VmHWM") - base
    return result


def measure_in_child(backend, T, argv):
    """CPU: a fresh process per run, so its peak RSS belongs to that run alone."""
    cmd = [sys.executable, __file__, *argv, "--one", backend, str(T)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"backend": backend, "T": T, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--L", type=int, default=256)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--lookahead", type=int, default=3)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backends", nargs="+", default=["flex", "blocked", "dense"], choices=list(TIMED))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--mem-limit-gb", type=float, default=8.0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", nargs=2, metavar=("BACKEND", "T"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    torch.manual_seed(0)

    if a.one:  # child process of a CPU run
        print(json.dumps(measure(a.one[0], int(a.one[1]), a)))
        return

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    print(
        f"# device={a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else f'{torch.get_num_threads()} threads'})"
        f" dtype={a.dtype} torch={torch.__version__} B={a.batch} L={a.L} d={a.dim} heads={a.heads}"
        f" (lookahead {a.lookahead}) k={a.k} repeats={a.repeats} warmup={a.warmup}"
    )
    results = []
    header = "| T | S | backend | fwd ms | fwd+bwd ms | peak GB |" + (" fwd TFLOP/s | fwd+bwd TFLOP/s |" if a.device == "cuda" else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for T in a.T:
        for backend in a.backends:
            est = estimate_peak_bytes(backend, T, a, a.device) / 1e9
            S = (T + 2) * a.L
            # On CPU also leave 2 GB of what the machine has free right now.
            limit = a.mem_limit_gb if a.device == "cuda" else min(a.mem_limit_gb, mem_available_gb() - 2)
            if est > limit:
                r = {"backend": backend, "T": T, "S": S, "skipped": f"est. {est:.1f} GB > {limit:.1f} GB"}
            elif a.device == "cpu":
                r = measure_in_child(backend, T, _strip_json(argv))
            else:
                r = measure(backend, T, a)
            results.append(r)
            if "skipped" in r or "error" in r:
                why = f"skipped (memory): {r['skipped']}" if "skipped" in r else f"error: {r['error']}"
                print(f"| {T} | {S} | {backend} | {why} | | |", flush=True)
                continue
            line = f"| {T} | {S} | {backend} | {fmt(r['fwd_ms'], '.1f')} | {fmt(r['fwd_bwd_ms'], '.1f')} | {r['peak_gb']:.2f} |"
            if a.device == "cuda":
                line += f" {fmt(r.get('fwd_tflops'), '.1f')} | {fmt(r.get('fwd_bwd_tflops'), '.1f')} |"
            print(line, flush=True)

    print()
    for line in ratios(results):
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)


def _strip_json(argv):
    """The parent's arguments for a child run, without --json (only the parent writes it)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x == "--json":
            skip = True
            continue
        out.append(x)
    return out


def ratios(results):
    """The goals: blocked vs dense at T=32 (fwd+bwd), and blocked's growth from T=16 to T=128."""
    t = {(r["backend"], r["T"]): r.get("fwd_bwd_ms") for r in results if "fwd_bwd_ms" in r}
    f = {(r["backend"], r["T"]): r.get("fwd_ms") for r in results if "fwd_ms" in r}
    lines = []
    for T in sorted({T for _, T in t}):
        if t.get(("dense", T)) and t.get(("blocked", T)):
            lines.append(f"dense/blocked fwd+bwd at T={T}: {t[('dense', T)] / t[('blocked', T)]:.2f}x")
        if f.get(("flex", T)) and f.get(("blocked", T)):
            lines.append(f"flex/blocked fwd at T={T}: {f[('flex', T)] / f[('blocked', T)]:.2f}x")
    if t.get(("blocked", 128)) and t.get(("blocked", 16)):
        lines.append(f"blocked fwd+bwd time(T=128)/time(T=16): {t[('blocked', 128)] / t[('blocked', 16)]:.2f}")
    return lines


if __name__ == "__main__":
    main()
