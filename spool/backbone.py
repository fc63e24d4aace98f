"""The frozen image backbone: DINOv2 (or any timm ViT) run per frame.

Backbones are data: Spool's short names map to timm model names in one table, and timm
builds the architecture and converts checkpoints (spool.weights finds and reads the files).
One thing Spool does itself: DINOv2's position table is resized to the crop's patch grid by
the official rule (``interpolate_pos_embed_dinov2``), not timm's, so the features are the
official model's. Spool never reimplements the ViT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from spool.weights import WeightsError, read_state_dict, weights_file_in

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


@dataclass(frozen=True)
class WeightsIdentity:
    """What the features were computed with; stored in the feature store's attributes."""

    source: str  # "hub" | "file" | "random"
    pretrained: bool
    hub_id: str | None = None
    file: str | None = None
    sha256: str | None = None
    seed: int | None = None
    pos_embed: dict[str, Any] | None = None  # how the position table was resized (pos_embed_rule)


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


# How each DINOv2 hub model resizes its 37x37 position table to the crop's patch grid, at run
# time (hubconf.py: `interpolate_antialias`, `interpolate_offset`). timm instead resamples the
# table once at load (bicubic, antialiased, exact size), which moves patch tokens by up to 0.02
# in cosine at 224 px; Spool puts the officially interpolated table into timm's model instead.
DINOV2_POS_EMBED = {"antialias": False, "offset": 0.1}
DINOV2_REG_POS_EMBED = {"antialias": True, "offset": 0.0}


def pos_embed_rule(backbone: str) -> dict[str, Any]:
    """The position-table rule for a backbone, as recorded in the store's attributes."""
    arch = timm_name(backbone).split(".")[0]
    if "dinov2" not in arch:
        return {"rule": "timm", "mode": "bicubic", "antialias": True}
    official = DINOV2_REG_POS_EMBED if "_reg" in arch else DINOV2_POS_EMBED
    return {"rule": "dinov2", "mode": "bicubic", **official}


def interpolate_pos_embed_dinov2(
    patch_pos: torch.Tensor, grid: tuple[int, int], *, antialias: bool, offset: float
) -> torch.Tensor:
    """(1, M*M, D) patch position table -> (1, gh*gw, D), as DINOv2's ``interpolate_pos_encoding``.

    With an offset the official code passes a scale factor (grid + offset) / M, not a size:
    the sampling positions differ from a size-based resize even at the same output size.
    """
    _, n, dim = patch_pos.shape
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table of {n} patches is not square")
    gh, gw = grid
    if (gh, gw) == (m, m):
        return patch_pos
    table = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": (float(gh + offset) / m, float(gw + offset) / m)}
    else:
        kwargs = {"size": (gh, gw)}
    out = F.interpolate(table, mode="bicubic", antialias=antialias, **kwargs)
    assert tuple(out.shape[-2:]) == (gh, gw), out.shape
    return out.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(patch_pos.dtype)


def _apply_pos_embed_rule(vit: nn.Module, image_size: int, rule: dict[str, Any]) -> dict[str, Any]:
    """Move a DINOv2 model built at its native grid to ``image_size`` by the official rule."""
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    native = vit.pos_embed.detach().clone()
    native_grid = vit.patch_embed.grid_size
    vit.set_input_size(img_size=(image_size, image_size))  # timm resamples; replaced just below
    patch_pos = interpolate_pos_embed_dinov2(
        native[:, prefix:], vit.patch_embed.grid_size, antialias=rule["antialias"], offset=rule["offset"]
    )
    with torch.no_grad():
        vit.pos_embed.copy_(torch.cat([native[:, :prefix], patch_pos], dim=1))
    return {**rule, "from_grid": list(native_grid), "to_grid": list(vit.patch_embed.grid_size)}


def _native_grid(pos_embed: torch.Tensor) -> int:
    """Patches a side of a saved position table, with or without a class-token row."""
    n = pos_embed.shape[1]
    for patches in (n, n - 1):
        if math.isqrt(patches) ** 2 == patches:
            return math.isqrt(patches)
    raise WeightsError(f"the checkpoint's position table has {n} rows: not a square patch grid")


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
    respected), a path to an official DINOv2 `.pth`, a timm `.pth`/`.safetensors`, or Hugging
    Face `Dinov2Model` weights (`model.safetensors`, `pytorch_model.bin`, or a snapshot folder),
    or "random" (seeded). Random weights are only ever used when asked for by name.

    DINOv2 models are built at their native grid and moved to ``image_size`` by the official
    position-table rule (``pos_embed_rule``), whatever the weights' source; other timm ViTs
    keep timm's resampling. The rule used is in ``identity.pos_embed``.
    """
    name = timm_name(backbone)
    arch = name.split(".")[0]
    rule = pos_embed_rule(backbone)
    official = rule["rule"] == "dinov2"
    # DINOv2 first at its native size (the saved table's grid), so timm resamples nothing.
    size_kwargs = {} if official else {"img_size": image_size}
    if weights == "random":
        warnings.warn(
            f"backbone {backbone}: RANDOM weights (seed {seed}) were requested; "
            "features are meaningless for comparisons with published numbers",
            stacklevel=2,
        )
        torch.manual_seed(seed)
        vit = timm.create_model(arch, pretrained=False, num_classes=0, **size_kwargs)
        identity = WeightsIdentity(source="random", pretrained=False, seed=seed)
    elif weights == "pretrained":
        # Offline without the weights cached: an error in seconds, not after a minute of hub
        # retries, for every caller (spool extract checks this earlier too; spool predict does not).
        check_pretrained_available(backbone)
        try:
            vit = timm.create_model(name, pretrained=True, num_classes=0, **size_kwargs)
        except Exception as err:  # hub/network/cache errors come in many types
            raise WeightsError(
                f"could not load pretrained weights for {backbone} ({name}) from the hub cache: {err}. "
                "On an offline machine, download them elsewhere and pass --weights PATH "
                "(an official DINOv2 .pth, a timm .safetensors, or Hugging Face facebook/dinov2-* files), "
                "or pass --weights random for a test run without meaningful features."
            ) from err
        hub_id = vit.pretrained_cfg.get("hf_hub_id") or name
        identity = WeightsIdentity(source="hub", pretrained=True, hub_id=hub_id)
    else:
        path = Path(weights).expanduser()
        if not (path.is_file() or path.is_dir()):
            raise WeightsError(
                f"--weights {weights!r} is neither 'pretrained', 'random' nor an existing file or folder"
            )
        weights_file = weights_file_in(path)
        vit = _vit_from_file(arch, weights_file, official, image_size)
        identity = WeightsIdentity(
            source="file", pretrained=True, file=str(weights_file.resolve()), sha256=file_sha256(weights_file)
        )
    if official:
        identity = dataclasses.replace(identity, pos_embed=_apply_pos_embed_rule(vit, image_size, rule))
    else:
        identity = dataclasses.replace(identity, pos_embed=rule)
    return FrameEncoder(vit, token_pool=token_pool), identity


def _vit_from_file(arch: str, path: Path, official: bool, image_size: int) -> nn.Module:
    """A timm ViT with the weights of one file, in the official, timm or Hugging Face layout."""
    try:
        state = read_state_dict(path)
    except Exception as err:
        raise WeightsError(f"could not read backbone weights from {path}: {err}") from err
    if "pos_embed" not in state:
        raise WeightsError(f"{path} holds no position table ('pos_embed'): not the weights of a ViT")
    vit = timm.create_model(arch, pretrained=False, num_classes=0, **({} if official else {"img_size": image_size}))
    if official:
        # build at the saved table's grid (37 for DINOv2 files, but a timm file may be saved at 224)
        grid = _native_grid(state["pos_embed"])
        if vit.patch_embed.grid_size != (grid, grid):
            vit.set_input_size(img_size=grid * vit.patch_embed.patch_size[0])
    has_registers = "register_tokens" in state or "reg_token" in state
    if has_registers != (getattr(vit, "reg_token", None) is not None):
        raise WeightsError(
            f"{path} {'has' if has_registers else 'has no'} register tokens, but --backbone {arch} "
            f"{'has none' if has_registers else 'needs them'}: pass the {'_reg' if has_registers else 'plain'} variant "
            "of the backbone, or the weights that go with it"
        )
    try:
        # timm's filter converts official DINOv2 keys (mask token, registers, SwiGLU names) and
        # resamples tables that do not fit (only for non-DINOv2 models here).
        converted = checkpoint_filter_fn(state, vit)
    except Exception as err:
        raise WeightsError(f"could not load backbone weights from {path} into {arch}: {err}") from err
    expected = vit.state_dict()
    misfits = [k for k in expected if k not in converted or converted[k].shape != expected[k].shape]
    unexpected = [k for k in converted if k not in expected and not k.startswith("head.")]
    if misfits or unexpected:
        shown = ", ".join(
            f"{k} {tuple(converted[k].shape) if k in converted else 'missing'} vs {tuple(expected[k].shape)}"
            for k in misfits[:3]
        )
        raise WeightsError(
            f"{path} does not fit {arch} ({len(misfits)} tensors missing or of another shape: {shown}"
            f"{'; unexpected ' + ', '.join(unexpected[:3]) if unexpected else ''}). "
            "Check --backbone: the model size (s, b, l, g) must be the one the weights were trained as"
        )
    vit.load_state_dict({k: converted[k] for k in expected})
    return vit


def normalize_frames(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised (B, 3, H, W). Runs on the frames' device, so on a GPU
    only uint8 bytes cross the bus."""
    x = frames.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# --- checks run before anything heavy (spool extract validates its options with these) -------

# (kept apart from the imports above so that this section merges on its own)
from typing import Callable  # noqa: E402

# Files timm looks for in a Hugging Face repo, in its order of preference.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def check_backbone_options(backbone: str, image_size: int, token_pool: int = 1) -> int:
    """Refuse a backbone that is not a ViT, and a ``--size`` or ``--token-pool`` that does not tile
    its patch grid, before any weights are loaded. Returns the patch grid side (size / patch).

    The architecture is built on the meta device: no memory, no weights, a fraction of a second
    even for ViT-g, and it is timm's own answer to "what is the patch size of this model"."""
    name = timm_name(backbone)
    arch = name.split(".")[0]
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as err:  # timm raises many kinds for models it cannot build this way
        raise ValueError(f"--backbone {backbone}: timm cannot build {arch!r} ({err})") from err
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(
            f"--backbone {backbone} is a timm model but not a Vision Transformer ({type(model).__name__}); "
            f"spool extract stores per-patch tokens and needs a ViT: use one of {known}, or a timm ViT name "
            "(e.g. vit_base_patch16_clip_224.openai)"
        )
    patch = int(patch_embed.patch_size[0])
    if image_size % patch:
        lower, upper = image_size // patch * patch, (image_size // patch + 1) * patch
        options = f"--size {lower} or --size {upper}" if lower >= patch else f"--size {upper}"
        raise ValueError(
            f"--size {image_size} is not a multiple of {backbone}'s patch size {patch}: the patch grid would be "
            f"{image_size // patch}x{image_size // patch} and the last {image_size % patch} pixel rows and columns "
            f"would be dropped; pass {options}"
        )
    grid = image_size // patch
    if grid % token_pool:
        raise ValueError(
            f"--token-pool {token_pool} does not divide the {grid}x{grid} patch grid of --size {image_size} "
            f"(patch {patch}); choose a --token-pool that divides {grid}"
        )
    return grid


def hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout_s``. Behind a
    proxy the hub may answer while a direct connection cannot open: then this says True and
    leaves the answer to the download itself."""
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies

    url = urlparse(endpoint)
    if url.scheme in getproxies() or "all" in getproxies():
        return True
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_pretrained_available(backbone: str, *, reachable: Callable[[], bool] | None = None) -> None:
    """Fail in seconds, not after a minute of Hugging Face retries, when ``--weights pretrained``
    cannot work: the hub cache holds no weights for the backbone and the hub cannot be reached
    (or HF_HUB_OFFLINE is set). Weights timm fetches from a plain URL are not checked here."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    name = timm_name(backbone)
    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return
    files = [getattr(cfg, "hf_hub_filename", None), *_HUB_FILES]
    if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in files if f):
        return  # cached: timm loads it without the network
    offline = bool(constants.HF_HUB_OFFLINE)
    if not offline and (reachable or (lambda: hub_reachable(constants.ENDPOINT)))():
        return  # not cached, but the download can start
    why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached"
    raise WeightsError(
        f"--weights pretrained: the Hugging Face cache ({constants.HF_HUB_CACHE}) holds no weights for {backbone} "
        f"({hub_id}) and {why}. Download them on a machine with network access (they land in that cache), "
        "or pass --weights PATH (an official DINOv2 .pth or a timm .safetensors file), or --weights random "
        "for a test run without meaningful features."
    )
