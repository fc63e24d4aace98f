"""Which torch device a stage runs on, decided once from its config."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; an explicit CUDA device without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for but CUDA is not available; use device='cpu' or 'auto'")
    return d
