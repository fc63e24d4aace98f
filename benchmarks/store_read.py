"""How fast can a clip of patch tokens come back from a store? Random access, warm page cache.

    python benchmarks/store_read.py [--clips 256] [--batch 32] [--repeats 3] [--dir /tmp]

Builds a zarr store and an HDF5 store of realistic clips (T=16, L=256, D=384 float16, 3 MiB
per clip) with ``create_store``, plus a raw .npy file of the same bytes, reads every clip once
untimed (to warm the page cache, so disks do not decide the result), then times each read path
over a random permutation of the clips and prints clips/s and the ratio to the numpy memmap.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import zarr

from spool.stores import create_store, open_store

T, L, D = 16, 256, 384
CLIPS_PER_VIDEO = 4


def build(root: Path, num_clips: int) -> dict[str, Path]:
    m = num_clips // CLIPS_PER_VIDEO
    rng = np.random.default_rng(0)
    paths = {"zarr": root / "bench.zarr", "hdf5": root / "bench.h5", "npy": root / "bench.npy"}
    stores = [
        create_store(
            p, video_ids=[f"v{i}.mp4" for i in range(m)], labels=np.zeros(m, int), splits=np.zeros(m, int),
            class_names=["c"], clips_per_video=CLIPS_PER_VIDEO, num_frames=T, num_tokens=L, dim=D, attrs={},
        )
        for p in (paths["zarr"], paths["hdf5"])
    ]
    raw = np.lib.format.open_memmap(paths["npy"], mode="w+", dtype="<f2", shape=(m * CLIPS_PER_VIDEO, T, L, D))
    for v in range(m):
        patches = rng.standard_normal((CLIPS_PER_VIDEO, T, L, D), dtype=np.float32).astype(np.float16)
        cls = patches[:, :, 0]
        frames = np.tile(np.arange(T), (CLIPS_PER_VIDEO, 1))
        for s in stores:
            s.write_video(v, patches, cls, frames, num_frames=T, fps=25.0)
        raw[v * CLIPS_PER_VIDEO : (v + 1) * CLIPS_PER_VIDEO] = patches
    raw.flush()
    for s in stores:
        s.close()
    return paths


def clips_per_second(read: Callable[[np.ndarray], np.ndarray], order: np.ndarray, batch: int) -> float:
    read(order[:batch])  # warm-up call (opens, caches)
    start = time.perf_counter()
    checksum = 0.0
    for i in range(0, len(order), batch):
        checksum += float(read(order[i : i + batch])[..., 0, 0, 0].astype(np.float32).sum())
    return len(order) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the stores (default: a temp dir)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="spool-store-bench-"))
    try:
        t0 = time.perf_counter()
        paths = build(root, args.clips)
        print(f"built {args.clips} clips of {T}x{L}x{D} float16 ({T * L * D * 2 / 2**20:.1f} MiB each) "
              f"per store in {time.perf_counter() - t0:.1f}s")
        n = (args.clips // CLIPS_PER_VIDEO) * CLIPS_PER_VIDEO
        order = np.random.default_rng(1).permutation(n)

        z = zarr.open_group(paths["zarr"], mode="r")["patches"]
        h5 = h5py.File(paths["hdf5"], "r", locking=False)["patches"]
        mm = np.load(paths["npy"], mmap_mode="r")
        zs, hs = open_store(paths["zarr"]), open_store(paths["hdf5"])
        for i in order:  # warm the page cache for every file
            zs.read_patches([i]), hs.read_patches([i]), np.asarray(mm[i])

        buf = np.empty((args.batch, T, L, D), dtype="<f2")

        def memmap_into(idx: np.ndarray) -> np.ndarray:
            out = buf[: len(idx)]
            for k, i in enumerate(idx):
                out[k] = mm[i]
            return out

        one = lambda f: (lambda idx: f(int(idx[0])))  # noqa: E731
        cases = [
            # (name, read function, clips per call); "into buffer" reuses one output array
            ("numpy memmap, per clip", one(lambda i: np.array(mm[i])), 1),
            ("numpy memmap, batch into buffer", memmap_into, args.batch),
            ("numpy memmap, batch fancy index", lambda idx: mm[idx], args.batch),
            ("zarr array[i], per clip", one(lambda i: z[i]), 1),
            ("zarr oindex, batch", lambda idx: z.oindex[idx], args.batch),
            ("h5py dataset[i], per clip", one(lambda i: h5[i]), 1),
            ("h5py dataset[sorted idx], batch", lambda idx: h5[np.sort(idx)], args.batch),
            ("ZarrFeatureStore.read_patches, per clip", zs.read_patches, 1),
            ("ZarrFeatureStore.read_patches, batch", zs.read_patches, args.batch),
            ("ZarrFeatureStore.read_patches, batch into buffer", lambda idx: zs.read_patches(idx, out=buf[: len(idx)]), args.batch),
            ("HDF5FeatureStore.read_patches, per clip", hs.read_patches, 1),
            ("HDF5FeatureStore.read_patches, batch", hs.read_patches, args.batch),
            ("HDF5FeatureStore.read_patches, batch into buffer", lambda idx: hs.read_patches(idx, out=buf[: len(idx)]), args.batch),
        ]
        # The median of a few repeats: a shared VM's timings wander by 30% from run to run.
        results = {
            name: float(np.median([clips_per_second(fn, order, b) for _ in range(args.repeats)]))
            for name, fn, b in cases
        }
        base = results["numpy memmap, batch into buffer"]
        print(f"\nrandom order, warm page cache, batch = {args.batch} clips, median of {args.repeats} passes")
        print(f"{'read path':50s} {'clips/s':>8s} {'GiB/s':>6s} {'vs memmap':>10s}")
        for name, cps in results.items():
            print(f"{name:50s} {cps:8.0f} {cps * T * L * D * 2 / 2**30:6.2f} {cps / base:9.2f}x")
        print("(vs memmap: relative to 'numpy memmap, batch into buffer')")
        np.testing.assert_array_equal(zs.read_patches(order[:4]), mm[order[:4]])
        np.testing.assert_array_equal(hs.read_patches(order[:4]), mm[order[:4]])
        zs.close(), hs.close()
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
