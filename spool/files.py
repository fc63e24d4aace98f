"""Small files written whole: a reader sees the old content or the new, never part of it."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, atomically: written to ``<path>.tmp``, fsynced,
    then renamed over ``path``. The fsync comes first so that after a power loss the rename
    cannot have reached the disk before the bytes it names (an empty ``result.json``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
