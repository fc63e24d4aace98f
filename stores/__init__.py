"""Spool feature stores: ``create_store`` / ``open_store`` pick the backend from the suffix
(``.zarr`` directory in zarr v3 format, ``.h5``/``.hdf5`` file through h5py). The schema and the
``FeatureStore`` interface are in ``spool.stores.base``; docs/store-format.md describes both
backends, their commit protocol and crash guarantees."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spool.stores._common import COMMIT_INTERVAL_S, NON_CONTENT_ATTRS, build_attrs, check_create_inputs, fingerprint
from spool.stores.base import (
    DONE,
    FAILED,
    NO_SPLIT,
    PENDING,
    SCHEMA_VERSION,
    SPLIT_CODES,
    SPLIT_NAMES,
    STATUS_NAMES,
    ClipTable,
    StoreBusyError,
    FeatureStore,
    StoreError,
    VideoTable,
)

ZARR_SUFFIXES = (".zarr",)
HDF5_SUFFIXES = (".h5", ".hdf5")


def backend_for(path: str | Path) -> str:
    """"zarr" or "hdf5" from the path's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in ZARR_SUFFIXES:
        return "zarr"
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    allowed = ", ".join(ZARR_SUFFIXES + HDF5_SUFFIXES)
    raise StoreError(f"{path}: unknown store suffix {suffix!r}; name the store with one of {allowed}")


def create_store(
    path: str | Path,
    *,
    video_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    splits: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    clips_per_video: int,
    num_frames: int,
    num_tokens: int,
    dim: int,
    attrs: dict[str, Any],
    overwrite: bool = False,
) -> FeatureStore:
    """Create an empty store (every video PENDING) and return it open for writing (mode "a").

    An existing ``path`` is an error unless ``overwrite``; even then only a Spool store is
    replaced. ``attrs`` (JSON-serialisable) describe how features were made; put the command
    line under "command" so it stays out of the fingerprint.
    """
    backend = backend_for(path)
    ids, labels_a, splits_a = check_create_inputs(
        video_ids, labels, splits, class_names, clips_per_video, num_frames, num_tokens, dim
    )
    full = build_attrs(
        attrs, video_ids=ids, labels=labels_a, splits=splits_a, class_names=class_names,
        clips_per_video=clips_per_video, num_frames=num_frames, num_tokens=num_tokens, dim=dim,
    )
    if backend == "zarr":
        from spool.stores.zarr_store import create_zarr

        return create_zarr(Path(path), full, ids, labels_a, splits_a, overwrite)
    from spool.stores.hdf5_store import create_hdf5
    from spool.stores.shards import remove_shards

    store = create_hdf5(Path(path), full, ids, labels_a, splits_a, overwrite)
    remove_shards(path)  # shard records of a replaced file (zarr keeps them inside the store)
    return store


def open_store(path: str | Path, mode: str = "r") -> FeatureStore:
    """Open an existing store, checking its schema version and every array's shape and dtype.
    Mode "a" takes the writer lock; a second writer gets a StoreError naming the holder. It
    also merges the records of finished or killed shards first (``spool.stores.shards``)."""
    backend = backend_for(path)
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no store at {path}; create it with `spool extract SRC --out {path}`")
    if backend == "zarr":
        from spool.stores.zarr_store import ZarrFeatureStore as Backend
    else:
        from spool.stores.hdf5_store import HDF5FeatureStore as Backend
    store = Backend(path, mode)
    if mode == "a":
        from spool.stores.shards import merge_journals

        try:
            merge_journals(store)
        except BaseException:
            store.close()
            raise
    return store


from spool.stores.summary import summarize  # noqa: E402  (summary imports base, not this module)

__all__ = [
    "COMMIT_INTERVAL_S", "DONE", "FAILED", "NO_SPLIT", "NON_CONTENT_ATTRS", "PENDING", "SCHEMA_VERSION", "SPLIT_CODES", "SPLIT_NAMES",
    "STATUS_NAMES", "ClipTable", "FeatureStore", "StoreBusyError", "StoreError", "VideoTable", "backend_for", "create_store",
    "fingerprint", "open_store", "summarize",
]
