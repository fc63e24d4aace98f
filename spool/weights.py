"""Backbone weight files: find them, read them, and bring Hugging Face DINOv2 keys to the official layout.

Three layouts reach ``--weights PATH``:

- official DINOv2 (``dinov2_vits14_pretrain.pth``): ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``,
  ``pos_embed`` with the class-token row, ``mask_token``, ``register_tokens`` for ``_reg``;
- timm (``model.safetensors`` of ``timm/vit_*_dinov2.lvd142m``): timm's own names;
- Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``facebook/dinov2-*``):
  ``embeddings.*``, ``encoder.layer.N.attention.attention.{query,key,value}``, ``layernorm``.

Hugging Face files are converted to the official layout here (``hf_to_official``); timm's own
``checkpoint_filter_fn`` takes official and timm files from there, so there is one conversion
per layout and none of them is Spool's reimplementation of the ViT.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what a Hugging Face snapshot folder holds


class WeightsError(RuntimeError):
    """Backbone weights could not be loaded; the message says what to pass instead."""


def weights_file_in(path: Path) -> Path:
    """A weights file, or the one inside a Hugging Face snapshot folder or cache repo folder."""
    if path.is_file():
        return path
    snapshots = path / "snapshots"
    if snapshots.is_dir():  # models--facebook--dinov2-small in the HF cache: the ref main points at one snapshot
        ref = path / "refs" / "main"
        candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else sorted(snapshots.iterdir())
    else:
        candidates = [path]
    for folder in candidates:
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
    raise WeightsError(
        f"--weights {path}: a folder without weights; expected {' or '.join(WEIGHT_FILES)} in it "
        "(a Hugging Face snapshot), or pass the weights file itself"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .pth, .pt or .bin file, in the official or timm layout."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # official .pth files are plain state dicts; training checkpoints wrap them
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state.get(key), dict):
            state = state[key]
    if is_hf_dinov2(state):
        state = hf_to_official(state)
    return state


def is_hf_dinov2(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


# Hugging Face name (after "encoder.layer.N.") -> official name (after "blocks.N.")
_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",  # ViT-g's SwiGLU
    "mlp.weights_out": "mlp.w3",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` keys -> official DINOv2 keys; q, k and v fused into qkv."""
    prefix = next(k for k in state if k.endswith("embeddings.patch_embeddings.projection.weight"))[
        : -len("embeddings.patch_embeddings.projection.weight")
    ]  # "dinov2." in Dinov2ForImageClassification files
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", key)
        if m is None:
            raise WeightsError(f"Hugging Face DINOv2 weights: unexpected key {key!r}")
        block, name, kind = int(m.group(1)), m.group(2), m.group(3)
        part = re.fullmatch(r"attention\.attention\.(query|key|value)", name)
        if part:
            qkv.setdefault((block, kind), {})[part.group(1)] = value
        elif kind == "lambda1":
            out[f"blocks.{block}.{_HF_BLOCK[name + '.lambda1']}"] = value
        elif name in _HF_BLOCK:
            out[f"blocks.{block}.{_HF_BLOCK[name]}.{kind}"] = value
        else:
            raise WeightsError(f"Hugging Face DINOv2 weights: unexpected key {key!r}")
    for (block, kind), parts in qkv.items():
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    out.setdefault("mask_token", torch.zeros(1, out["cls_token"].shape[-1]))  # marks the official layout for timm
    if out["mask_token"].ndim == 3:
        out["mask_token"] = out["mask_token"][0]
    return out
