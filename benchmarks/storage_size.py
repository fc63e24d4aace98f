"""How much disk a feature store takes: bytes per clip for each DINOv2 size, and per dataset.

    python benchmarks/storage_size.py [--frames 16] [--size 224] [--check-dir /tmp]

Bytes per clip come from the store schema itself (``expected_arrays``: patches, cls and the
small per-clip arrays), so the table follows the schema if it changes. ``--check-dir`` also
builds a real zarr and HDF5 store of a few ViT-S clips with ``create_store``, fills them, and
compares their size on disk with the computed figure (the gap is chunk-file and metadata
overhead). Prints the markdown table that README.md's "Scaling out" section carries.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from spool.data import pooled_num_tokens
from spool.stores import create_store
from spool.stores._common import expected_arrays
from spool.stores.summary import bytes_on_disk

WIDTHS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536}
PATCH = 14
# Videos per dataset, all official splits together (Kinetics-400: what its CSVs list; the
# part still downloadable today is smaller, often ~240k train + ~20k val).
DATASETS = {"UCF101": 13_320, "SSv2": 220_847, "Kinetics-400": 306_245}


def bytes_per_clip(frames: int, num_tokens: int, dim: int) -> int:
    """Bytes one clip adds to a store: its per-clip arrays, and 1/clips_per_video of the
    per-video ones (here clips_per_video = 1, so a clip is a video; strings count as 0)."""
    specs = expected_arrays(1, 1, frames, num_tokens, dim)
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs.values() if s.dtype != "str")


def table(frames: int, image_size: int) -> str:
    grid = image_size // PATCH
    rows = ["| backbone | token pool | tokens L | MiB / clip | " + " | ".join(DATASETS) + " |",
            "|---|---|---|---|" + "---|" * len(DATASETS)]
    for name, dim in WIDTHS.items():
        for pool in (1, 2):
            tokens = pooled_num_tokens(grid * grid, pool)
            per_clip = bytes_per_clip(frames, tokens, dim)
            sizes = " | ".join(_human(per_clip * n) for n in DATASETS.values())
            rows.append(f"| {name} | {pool} | {tokens} | {per_clip / 2**20:.2f} | {sizes} |")
    return "\n".join(rows)


def _human(n: float) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.0f} GiB"


def check(root: Path, frames: int, image_size: int, clips: int = 24) -> None:
    grid = image_size // PATCH
    tokens, dim = grid * grid, WIDTHS["dinov2_vits14"]
    expected = bytes_per_clip(frames, tokens, dim) * clips
    rng = np.random.default_rng(0)
    for suffix in (".zarr", ".h5"):
        path = root / f"size{suffix}"
        with create_store(
            path, video_ids=[f"v{i}" for i in range(clips)], labels=[0] * clips, splits=[0] * clips,
            class_names=["a"], clips_per_video=1, num_frames=frames, num_tokens=tokens, dim=dim, attrs={},
        ) as store:  # fmt: skip
            for v in range(clips):
                patches = rng.standard_normal((1, frames, tokens, dim)).astype(np.float16)
                store.write_video(v, patches, patches[:, :, 0], np.arange(frames)[None], frames, 25.0)
        measured = bytes_on_disk(path)
        print(f"{suffix}: {clips} ViT-S clips at {image_size} px: computed {expected / 2**20:.2f} MiB, "
              f"on disk {measured / 2**20:.2f} MiB ({measured / expected:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--check-dir", type=Path, default=None)
    args = parser.parse_args()
    print(f"T = {args.frames} frames per clip, {args.size} px, one clip per video, float16\n")
    print(table(args.frames, args.size))
    if args.check_dir is not None:
        root = Path(tempfile.mkdtemp(dir=args.check_dir))
        try:
            print()
            check(root, args.frames, args.size)
        finally:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
