"""The frozen image backbone: DINOv2 (or any timm ViT) run per frame.

Backbones are data: Spool's short names map to timm model names in one table, and
timm does everything else (architecture, official-checkpoint conversion, position
embedding resampling to the requested image size). Spool never reimplements the ViT.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

# Spool name -> timm name (architecture.pretrained_tag). The `_reg` variants carry 4 register tokens.
BACKBONES: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Backbone weights could not be loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class WeightsIdentity:
    """What the features were computed with; stored in the feature store's attributes."""

    source: str  # "hub" | "file" | "random"
    pretrained: bool
    hub_id: str | None = None
    file: str | None = None
    sha256: str | None = None
    seed: int | None = None


def timm_name(backbone: str) -> str:
    """Spool short name -> timm name; any other timm ViT name passes through (CLIP, SigLIP ablations)."""
    if backbone in BACKBONES:
        return BACKBONES[backbone]
    arch = backbone.split(".")[0]
    if not timm.is_model(arch):
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {backbone!r}: use one of {known}, or a timm ViT model name")
    return backbone


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


class FrameEncoder(nn.Module):
    """A frozen ViT that maps normalised frames (B, 3, H, W) to (cls (B, D), patches (B, L, D)).

    Register tokens are dropped; `token_pool` P averages each P x P block of the patch grid.
    """

    def __init__(self, vit: nn.Module, token_pool: int = 1):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.has_cls = bool(getattr(vit, "cls_token", None) is not None)
        grid_h, grid_w = vit.patch_embed.grid_size
        if grid_h % token_pool or grid_w % token_pool:
            raise ValueError(f"token_pool={token_pool} does not divide the {grid_h}x{grid_w} patch grid")
        self.grid = (grid_h, grid_w)
        self.token_pool = token_pool
        self.dim = int(vit.embed_dim)
        self.patch_size = int(vit.patch_embed.patch_size[0])

    @property
    def num_tokens(self) -> int:
        return (self.grid[0] // self.token_pool) * (self.grid[1] // self.token_pool)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.vit.forward_features(frames)  # (B, prefix + gh*gw, D), after the final norm
        patches = tokens[:, self.num_prefix_tokens :]
        # Models without a CLS token (some SigLIP variants) get the patch mean in its place.
        cls = tokens[:, 0] if self.has_cls else patches.mean(dim=1)
        if self.token_pool > 1:
            b, _, d = patches.shape
            gh, gw = self.grid
            p = self.token_pool
            grid = patches.reshape(b, gh // p, p, gw // p, p, d)
            patches = grid.mean(dim=(2, 4)).reshape(b, -1, d)  # (B, L, D)
        return cls, patches


def load_backbone(
    backbone: str,
    *,
    weights: str = "pretrained",
    image_size: int = 224,
    token_pool: int = 1,
    seed: int = 0,
) -> tuple[FrameEncoder, WeightsIdentity]:
    """Build the frozen frame encoder.

    weights: "pretrained" (timm's hub weights; the Hugging Face cache and HF_HUB_OFFLINE are
    respected), a path to an official DINOv2 `.pth` or a timm `.pth`/`.safetensors` file, or
    "random" (seeded). Random weights are only ever used when asked for by name.
    """
    name = timm_name(backbone)
    arch = name.split(".")[0]
    kwargs = dict(num_classes=0, img_size=image_size)
    if weights == "random":
        warnings.warn(
            f"backbone {backbone}: RANDOM weights (seed {seed}) were requested; "
            "features are meaningless for comparisons with published numbers",
            stacklevel=2,
        )
        torch.manual_seed(seed)
        vit = timm.create_model(arch, pretrained=False, **kwargs)
        identity = WeightsIdentity(source="random", pretrained=False, seed=seed)
    elif weights == "pretrained":
        try:
            vit = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # hub/network/cache errors come in many types
            raise WeightsError(
                f"could not load pretrained weights for {backbone} ({name}) from the hub cache: {err}. "
                "On an offline machine, download them elsewhere and pass --weights PATH "
                "(an official DINOv2 .pth or a timm .safetensors file), or pass --weights random "
                "for a test run without meaningful features."
            ) from err
        hub_id = vit.pretrained_cfg.get("hf_hub_id") or name
        identity = WeightsIdentity(source="hub", pretrained=True, hub_id=hub_id)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"--weights {weights!r} is neither 'pretrained', 'random' nor an existing file"
            )
        try:
            # timm loads the file through the model's checkpoint filter, which converts official
            # DINOv2 checkpoints and resamples position embeddings to image_size.
            vit = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except Exception as err:
            raise WeightsError(f"could not load backbone weights from {path} into {arch}: {err}") from err
        identity = WeightsIdentity(source="file", pretrained=True, file=str(path.resolve()), sha256=file_sha256(path))
    return FrameEncoder(vit, token_pool=token_pool), identity


def normalize_frames(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised (B, 3, H, W). Runs on the frames' device, so on a GPU
    only uint8 bytes cross the bus."""
    x = frames.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std
