"""Which torch device a stage runs on, decided once from its config."""

from __future__ import annotations

import torch


def parse_device(device: str) -> torch.device:
    """``--device`` as a torch.device; a string torch cannot read is refused with the option's name
    (torch's own error is a RuntimeError listing two dozen device types)."""
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; pass auto, cpu, cuda or cuda:N") from None


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; an explicit CUDA device without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = parse_device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for but CUDA is not available; pass --device cpu or auto")
    return d
