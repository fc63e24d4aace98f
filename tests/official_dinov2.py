"""An exact port of the official DINOv2 forward (facebookresearch/dinov2, dinov2/models/vision_transformer.py
and dinov2/layers/*), from an official-layout state dict, in plain torch: the reference Spool's
features are tested against. Written from the official code, not from timm, so that a
difference between timm and the official model shows.

``layerscale=False`` and ``final_norm=False`` break the port on purpose: a test that cannot
tell those apart from the official model could not fail.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def interpolate_pos_encoding(pos_embed, npatch, w, h, patch_size, *, antialias, offset):
    """``DinoVisionTransformer.interpolate_pos_encoding``, line for line (x replaced by its patch count)."""
    previous_dtype = pos_embed.dtype
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))
    assert N == M * M
    kwargs = {}
    if offset:
        sx = float(w0 + offset) / M
        sy = float(h0 + offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def official_forward(state, x, *, num_heads, antialias, offset, layerscale=True, final_norm=True):
    """x (B, 3, H, W) -> (x_norm_clstoken (B, D), x_norm_patchtokens (B, L, D)), registers dropped."""
    s = {k: v.float() for k, v in state.items()}
    patch_size = s["patch_embed.proj.weight"].shape[-1]
    B, _, w, h = x.shape
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch_size)
    t = t.flatten(2).transpose(1, 2)  # PatchEmbed: (B, L, D)
    t = torch.cat((s["cls_token"].expand(B, -1, -1), t), dim=1)
    t = t + interpolate_pos_encoding(s["pos_embed"], t.shape[1] - 1, w, h, patch_size, antialias=antialias, offset=offset)
    registers = s.get("register_tokens")
    if registers is not None:
        t = torch.cat((t[:, :1], registers.expand(B, -1, -1), t[:, 1:]), dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    dim = t.shape[-1]
    for i in range(depth):
        p = f"blocks.{i}."
        ls1 = s[p + "ls1.gamma"] if layerscale else 1.0
        ls2 = s[p + "ls2.gamma"] if layerscale else 1.0
        y = F.layer_norm(t, (dim,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
        # Attention: qkv, scaled dot product, proj
        qkv = F.linear(y, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"]).reshape(B, -1, 3, num_heads, dim // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * (dim // num_heads) ** -0.5) @ k.transpose(-2, -1)
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, -1, dim)
        y = F.linear(y, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        t = t + ls1 * y
        y = F.layer_norm(t, (dim,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])), s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
        t = t + ls2 * y
    if final_norm:
        t = F.layer_norm(t, (dim,), s["norm.weight"], s["norm.bias"], eps=1e-6)
    prefix = 1 + (0 if registers is None else registers.shape[1])
    return t[:, 0], t[:, prefix:]
