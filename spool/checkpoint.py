"""Head checkpoints that load without repeating options (nanochat's checkpoint_manager).

A checkpoint is one ``torch.save`` dict holding the weights and, as plain dicts, every
config needed to rebuild them: the head's name and config (``asdict``), the resolved
TrainConfig and the store's path and fingerprint. Writes go to a temporary file that
replaces the old one (``os.replace``), so a kill mid-write never leaves a broken file.
"""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from spool.baselines import AttentiveProbe, AttentiveProbeConfig, MeanLinearConfig, MeanLinearHead
from spool.model import HeadConfig, SpoolHead

CHECKPOINT_VERSION = 1

# head name -> (module class, config class); each module class declares its ``inputs``.
# "full" and "factorized" are SpoolHeads whose HeadConfig.attention is that name.
HEADS: dict[str, tuple[type[nn.Module], type]] = {
    "spool": (SpoolHead, HeadConfig),
    "full": (SpoolHead, HeadConfig),
    "factorized": (SpoolHead, HeadConfig),
    "mean-linear": (MeanLinearHead, MeanLinearConfig),
    "attentive-probe": (AttentiveProbe, AttentiveProbeConfig),
}
HEAD_INPUTS: dict[str, tuple[str, ...]] = {
    "spool": ("patches",),
    "full": ("patches",),
    "factorized": ("patches",),
    "mean-linear": MeanLinearHead.inputs,
    "attentive-probe": AttentiveProbe.inputs,
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match what was asked."""


def build_head(head: str, head_config: dict | Any, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a head from its name and its config (a dataclass or its ``asdict``), on
    ``device`` (SpoolHead picks its attention backend for that device)."""
    if head not in HEADS:
        raise CheckpointError(f"unknown head {head!r}; expected one of {sorted(HEADS)}")
    module_cls, config_cls = HEADS[head]
    cfg = head_config if is_dataclass(head_config) else config_cls(**head_config)
    if module_cls is SpoolHead:
        if cfg.attention != head:
            raise CheckpointError(f"head {head!r} with a HeadConfig of attention {cfg.attention!r}; they must agree")
        return SpoolHead(cfg, device=device)
    return module_cls(cfg).to(device)


def strip_compile_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch.compile wraps the model and prefixes every key with ``_orig_mod.``."""
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}


def save_checkpoint(path: str | Path, payload: dict) -> None:
    path = Path(path)
    payload = {"checkpoint_version": CHECKPOINT_VERSION, **payload}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _patch_payload(payload: dict) -> dict:
    """Where old checkpoint layouts get upgraded, one named step per version."""
    version = payload.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint version {version!r} is not supported (expected {CHECKPOINT_VERSION})")
    return payload


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"{path}: not a readable Spool checkpoint ({e})") from e
    if not isinstance(payload, dict) or "model" not in payload or "head" not in payload:
        raise CheckpointError(f"{path}: not a Spool head checkpoint (missing 'model' or 'head')")
    return _patch_payload(payload)


def load_head(checkpoint_path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained head in eval mode, and its config: a dict with ``head``,
    ``head_config``, ``train`` (the resolved TrainConfig, including ``token_pool``) and
    ``store`` (path and fingerprint), the same content as the run's config.json."""
    payload = load_checkpoint(checkpoint_path, map_location)
    model = build_head(payload["head"], payload["head_config"], device=map_location)
    model.load_state_dict(strip_compile_prefix(payload["model"]))
    model.eval()
    config = {k: payload.get(k) for k in ("head", "head_config", "train", "store")}
    return model, config
