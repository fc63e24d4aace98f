"""Loader throughput: spool.data.FeatureSet against a raw numpy memmap read of the same
bytes, and against how fast the default SpoolHead consumes clips (forward + backward).

    python benchmarks/loader.py                       # T=16, L=256, D=384, 320 clips, zarr
    python benchmarks/loader.py --backend h5 --clips 200 --model-steps 3

The synthetic store and the .npy copy go to a temporary directory (or --dir) and are
removed afterwards. Reads are timed with a warm page cache (every source is read once
before it is timed; best of two passes): the comparison is of the loader's overhead, not
of the disk. Each pass reads every clip once, in shuffled batches of sorted indices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_store(path: Path, clips: int, T: int, L: int, D: int, seed: int = 0, num_classes: int = 10) -> np.ndarray:
    from spool.stores import create_store

    C = 2  # clips per video
    videos = clips // C
    store = create_store(
        path,
        video_ids=[f"v{i:04d}.mp4" for i in range(videos)],
        labels=np.arange(videos) % num_classes,
        splits=np.full(videos, -1),
        class_names=[f"c{i}" for i in range(num_classes)],
        clips_per_video=C,
        num_frames=T,
        num_tokens=L,
        dim=D,
        attrs={"backbone": "synthetic"},
    )
    rng = np.random.default_rng(seed)
    all_patches = np.empty((videos * C, T, L, D), np.float16)
    for v in range(videos):
        patches = rng.standard_normal((C, T, L, D), dtype=np.float32).astype(np.float16)
        all_patches[v * C : (v + 1) * C] = patches
        store.write_video(v, patches, patches.mean(axis=2), np.tile(np.arange(T), (C, 1)), num_frames=T, fps=25.0)
    store.close()
    return all_patches


class StoreBatches(torch.utils.data.Dataset):
    """The alternative to FeatureSet's threads: a torch DataLoader over batches of indices,
    each worker process opening the store itself (store handles do not cross processes)."""

    def __init__(self, path: Path, groups: list[np.ndarray]):
        self.path, self.groups, self.store = path, groups, None

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.store is None:
            from spool.stores import open_store

            self.store = open_store(self.path)
        return torch.from_numpy(self.store.read_patches(self.groups[i]))


def batches_of(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[s : s + batch_size]) for s in range(0, n, batch_size)]


def rate(fn, n_clips: int, repeats: int = 2) -> float:
    """clips/s of the best of ``repeats`` runs, after one untimed warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_clips / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=320)
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--D", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backend", choices=["zarr", "h5"], default="zarr")
    ap.add_argument("--model-batch", type=int, default=2)
    ap.add_argument("--model-steps", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from spool.data import FeatureSet
    from spool.model import HeadConfig, SpoolHead
    from spool.stores import open_store

    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="spool-loader-", dir=args.dir))
    results: dict = {
        "clips": args.clips,
        "shape": [args.T, args.L, args.D],
        "clip_mib": args.T * args.L * args.D * 2 / 2**20,
        "batch_size": args.batch_size,
        "backend": args.backend,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        path = work / f"bench.{args.backend}"
        t0 = time.perf_counter()
        patches = write_store(path, args.clips, args.T, args.L, args.D)
        results["write_s"] = time.perf_counter() - t0
        n = len(patches)
        npy = work / "patches.npy"
        np.save(npy, patches)
        del patches
        groups = batches_of(n, args.batch_size, seed=0)

        mm = np.load(npy, mmap_mode="r")
        # the same contract as the loader (a fresh array per batch), and the ideal (one reused buffer)
        results["memmap_clips_s"] = rate(lambda: [np.array(mm[g]) for g in groups], n)
        buf = np.empty((args.batch_size, *mm.shape[1:]), np.float16)

        def memmap_into_buffer():
            for g in groups:
                for k, i in enumerate(g):
                    buf[k] = mm[i]

        results["memmap_reused_buffer_clips_s"] = rate(memmap_into_buffer, n)

        store = open_store(path)
        results["read_patches_clips_s"] = rate(lambda: [store.read_patches(g) for g in groups], n)
        for w in args.workers:
            fs = FeatureSet(store, np.arange(n), inputs=("patches",), cache="none", workers=w)
            epoch = iter(range(10**6))
            results[f"featureset_none_w{w}_clips_s"] = rate(
                lambda: [b for b in fs.batches(np.arange(n), args.batch_size, shuffle=True, epoch=next(epoch))], n
            )
        for w in (1, 2):
            loader = torch.utils.data.DataLoader(
                StoreBatches(path, groups), batch_size=None, shuffle=False, num_workers=w, persistent_workers=True
            )
            results[f"dataloader_processes_w{w}_clips_s"] = rate(lambda: [b for b in loader], n)
            del loader
        for w in (0, 2):
            results[f"featureset_memory_load_w{w}_clips_s"] = rate(
                lambda: FeatureSet(store, np.arange(n), inputs=("patches",), cache="memory", workers=w), n, repeats=1
            )
        fs = FeatureSet(store, np.arange(n), inputs=("patches",), cache="memory", workers=0)
        epoch = iter(range(10**6))
        results["featureset_memory_epoch_clips_s"] = rate(
            lambda: [b for b in fs.batches(np.arange(n), args.batch_size, shuffle=True, epoch=next(epoch))], n
        )
        del fs
        fs = FeatureSet(store, np.arange(n), token_pool=2, inputs=("patches",), cache="none", workers=0)
        epoch = iter(range(10**6))
        results["featureset_none_w0_pool2_clips_s"] = rate(
            lambda: [b for b in fs.batches(np.arange(n), args.batch_size, shuffle=True, epoch=next(epoch))], n
        )
        store.close()

        for pool, L in ((1, args.L), (2, args.L // 4)):
            torch.manual_seed(0)
            cfg = HeadConfig(in_dim=args.D, num_frames=args.T, num_tokens=L, num_classes=10, backend="blocked")
            model = SpoolHead(cfg, device="cpu")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randn(args.model_batch, args.T, L, args.D)
            y = torch.randint(0, 10, (args.model_batch,))

            def step():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()
            t0 = time.perf_counter()
            for _ in range(args.model_steps):
                step()
            results[f"model_pool{pool}_clips_s"] = args.model_batch * args.model_steps / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = max(results[f"featureset_none_w{w}_clips_s"] for w in args.workers)
    results["featureset_none_best_over_memmap"] = best / results["memmap_clips_s"]
    results["featureset_none_best_over_memmap_reused_buffer"] = best / results["memmap_reused_buffer_clips_s"]
    results["featureset_memory_epoch_over_memmap_reused_buffer"] = (
        results["featureset_memory_epoch_clips_s"] / results["memmap_reused_buffer_clips_s"]
    )
    results["load_average_1min"] = os.getloadavg()[0]
    for k, v in results.items():
        print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
