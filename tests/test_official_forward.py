"""Spool's DINOv2 features equal the official model's (tests/official_dinov2.py, an exact port).

Trained weights (../shared/real-dinov2) for the plain model; for ``_reg`` the same weights with
register tokens added, since the rule, not the training, is what is checked. Two sizes whose
grid is not the native 37.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from official_dinov2 import official_forward
from spool.backbone import DINOV2_POS_EMBED, DINOV2_REG_POS_EMBED, BACKBONES, load_backbone, pos_embed_rule

SIZES = (224, 126)  # grids 16 and 9


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).min())


def _frames(size: int) -> torch.Tensor:
    torch.manual_seed(0)
    # smooth images, like photographs after normalisation, rather than white noise
    low = torch.randn(2, 3, size // 14, size // 14)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") + 0.1 * torch.randn(2, 3, size, size)


@pytest.fixture(scope="module")
def official_state(real_dinov2):
    return load_file(str(real_dinov2 / "dinov2_vits14_real.safetensors"))


@pytest.fixture(scope="module")
def reg_file(official_state, tmp_path_factory):
    torch.manual_seed(1)
    state = dict(official_state, register_tokens=0.5 * torch.randn(1, 4, 384))
    path = tmp_path_factory.mktemp("reg") / "dinov2_vits14_reg4_pretrain.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.parametrize("size", SIZES)
def test_plain_model_matches_the_official_forward(real_dinov2, official_state, size):
    encoder, identity = load_backbone("dinov2_vits14", weights=str(real_dinov2 / "dinov2_vits14_real.safetensors"), image_size=size)
    assert identity.pos_embed["rule"] == "dinov2" and identity.pos_embed["to_grid"] == [size // 14] * 2
    x = _frames(size)
    cls, patches = encoder(x)
    ref_cls, ref_patches = official_forward(official_state, x, num_heads=6, **DINOV2_POS_EMBED)
    assert _min_cosine(cls, ref_cls) >= 0.9999
    assert _min_cosine(patches, ref_patches) >= 0.9999
    # the test can fail: a port without LayerScale, or without the final norm, is told apart
    for broken in (dict(layerscale=False), dict(final_norm=False)):
        bad_cls, bad_patches = official_forward(official_state, x, num_heads=6, **DINOV2_POS_EMBED, **broken)
        assert min(_min_cosine(cls, bad_cls), _min_cosine(patches, bad_patches)) < 0.9999, broken


def test_timm_resampling_alone_is_not_the_official_forward(real_dinov2, official_state):
    """What Spool did before: timm resamples the table once at load (antialiased, size-based)."""
    import timm

    vit = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=True, num_classes=0, img_size=224,
        pretrained_cfg_overlay={"file": str(real_dinov2 / "dinov2_vits14_real.safetensors")},
    ).eval()
    x = _frames(224)
    with torch.no_grad():
        patches = vit.forward_features(x)[:, 1:]
    _, ref_patches = official_forward(official_state, x, num_heads=6, **DINOV2_POS_EMBED)
    assert _min_cosine(patches, ref_patches) < 0.9999


@pytest.mark.parametrize("size", SIZES)
def test_register_model_matches_the_official_forward(reg_file, size):
    path, state = reg_file
    encoder, identity = load_backbone("dinov2_vits14_reg", weights=str(path), image_size=size)
    assert identity.pos_embed["antialias"] is True and identity.pos_embed["offset"] == 0.0
    x = _frames(size)
    cls, patches = encoder(x)
    ref_cls, ref_patches = official_forward(state, x, num_heads=6, **DINOV2_REG_POS_EMBED)
    assert _min_cosine(cls, ref_cls) >= 0.9999
    assert _min_cosine(patches, ref_patches) >= 0.9999
    bad_cls, bad_patches = official_forward(state, x, num_heads=6, **DINOV2_REG_POS_EMBED, layerscale=False)
    assert min(_min_cosine(cls, bad_cls), _min_cosine(patches, bad_patches)) < 0.9999


def test_every_dinov2_backbone_has_its_hub_rule():
    for name in BACKBONES:
        rule = pos_embed_rule(name)
        expected = DINOV2_REG_POS_EMBED if name.endswith("_reg") else DINOV2_POS_EMBED
        assert rule["rule"] == "dinov2" and (rule["antialias"], rule["offset"]) == (expected["antialias"], expected["offset"]), name
    assert pos_embed_rule("vit_base_patch16_clip_224.openai")["rule"] == "timm"


def test_hugging_face_and_official_files_give_equal_features(real_dinov2, tmp_path):
    official, _ = load_backbone("dinov2_vits14", weights=str(real_dinov2 / "dinov2_vits14_real.safetensors"), image_size=112)
    hf, identity = load_backbone("dinov2_vits14", weights=str(real_dinov2 / "dinov2_small_hf.safetensors"), image_size=112)
    x = _frames(112)
    for a, b in zip(official(x), hf(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a Hugging Face snapshot folder, as in the HF cache, and a pytorch_model.bin in it
    snapshot = tmp_path / "models--facebook--dinov2-small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--facebook--dinov2-small" / "refs").mkdir()
    (tmp_path / "models--facebook--dinov2-small" / "refs" / "main").write_text("abc123")
    torch.save(load_file(str(real_dinov2 / "dinov2_small_hf.safetensors")), snapshot / "pytorch_model.bin")
    cached, identity = load_backbone("dinov2_vits14", weights=str(tmp_path / "models--facebook--dinov2-small"), image_size=112)
    assert identity.file.endswith("abc123/pytorch_model.bin")
    torch.testing.assert_close(cached(x)[1], official(x)[1], rtol=0, atol=0)


def test_weights_that_do_not_fit_the_backbone_say_so(real_dinov2):
    from spool.weights import WeightsError

    with pytest.raises(WeightsError, match="register tokens"):
        load_backbone("dinov2_vits14_reg", weights=str(real_dinov2 / "dinov2_vits14_real.safetensors"), image_size=56)
    with pytest.raises(WeightsError, match="does not fit"):
        load_backbone("dinov2_vitb14", weights=str(real_dinov2 / "dinov2_small_hf.safetensors"), image_size=56)
