import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from spool.backbone import (
    WeightsError, check_backbone_options, check_pretrained_available, file_sha256, hub_reachable, load_backbone,
    normalize_frames, timm_name,
)  # fmt: skip


def _official_style_checkpoint(path, seed: int = 1) -> torch.nn.Module:
    """A ViT-S/14 state dict in the official DINOv2 layout: 518 px position embeddings, a mask token."""
    torch.manual_seed(seed)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    state = ref.state_dict()
    state["mask_token"] = torch.zeros(1, ref.embed_dim)
    torch.save(state, path)
    return ref


def test_official_checkpoint_loads_and_resamples_position_embeddings(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    ref = _official_style_checkpoint(path)
    encoder, identity = load_backbone("dinov2_vits14", weights=str(path), image_size=56)
    assert identity.source == "file" and identity.pretrained
    assert identity.sha256 == file_sha256(path)
    assert torch.equal(encoder.vit.blocks[3].mlp.fc1.weight, ref.blocks[3].mlp.fc1.weight)
    assert encoder.vit.pos_embed.shape[1] == 1 + 4 * 4  # 56 / 14 = 4 patches a side
    assert encoder.num_tokens == 16


def test_random_weights_are_seeded_and_announced():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        a, ident = load_backbone("dinov2_vits14", weights="random", image_size=28, seed=3)
    with pytest.warns(UserWarning):
        b, _ = load_backbone("dinov2_vits14", weights="random", image_size=28, seed=3)
    with pytest.warns(UserWarning):
        c, _ = load_backbone("dinov2_vits14", weights="random", image_size=28, seed=4)
    assert ident.source == "random" and not ident.pretrained and ident.seed == 3
    assert torch.equal(a.vit.patch_embed.proj.weight, b.vit.patch_embed.proj.weight)
    assert not torch.equal(a.vit.patch_embed.proj.weight, c.vit.patch_embed.proj.weight)


def test_offline_without_weights_is_a_clear_error_not_random_weights():
    code = (
        "from spool.backbone import load_backbone, WeightsError\n"
        "try:\n"
        "    load_backbone('dinov2_vits14', weights='pretrained', image_size=28)\n"
        "except WeightsError as e:\n"
        "    print('WEIGHTS-ERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-spool-test-cache"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "WEIGHTS-ERROR" in out.stdout
    assert "--weights PATH" in out.stdout and "--weights random" in out.stdout


def test_missing_weights_file_and_unknown_backbone_are_errors(tmp_path):
    with pytest.raises(WeightsError, match="neither"):
        load_backbone("dinov2_vits14", weights=str(tmp_path / "nope.pth"), image_size=28)
    with pytest.raises(ValueError, match="unknown backbone"):
        timm_name("dinov3_huge")
    assert timm_name("dinov2_vitl14_reg") == "vit_large_patch14_reg4_dinov2.lvd142m"
    assert timm_name("vit_base_patch16_clip_224.openai") == "vit_base_patch16_clip_224.openai"


def test_register_tokens_dropped_and_token_pool_averages_patch_blocks():
    with pytest.warns(UserWarning):
        plain, _ = load_backbone("dinov2_vits14_reg", weights="random", image_size=56, seed=0)
    with pytest.warns(UserWarning):
        pooled, _ = load_backbone("dinov2_vits14_reg", weights="random", image_size=56, seed=0, token_pool=2)
    x = torch.randn(2, 3, 56, 56)
    tokens = plain.vit.forward_features(x)
    assert tokens.shape[1] == 1 + 4 + 16  # CLS, 4 registers, 4x4 patches
    cls, patches = plain(x)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patches, tokens[:, 5:])
    _, pooled_patches = pooled(x)
    grid = tokens[:, 5:].reshape(2, 4, 4, -1)
    top_left = grid[:, 0:2, 0:2].mean(dim=(1, 2))
    bottom_right = grid[:, 2:4, 2:4].mean(dim=(1, 2))
    assert pooled_patches.shape == (2, 4, 384)
    torch.testing.assert_close(pooled_patches[:, 0], top_left)
    torch.testing.assert_close(pooled_patches[:, 3], bottom_right)


def test_normalize_frames_matches_imagenet_statistics():
    frames = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    x = normalize_frames(frames)
    assert x.shape == (3, 3, 8, 8)
    expected_red = (frames[..., 0].float() / 255 - 0.485) / 0.229
    torch.testing.assert_close(x[:, 0], expected_red)


def test_a_non_vit_backbone_and_a_size_off_the_patch_grid_are_refused_before_any_weights_load():
    with pytest.raises(ValueError, match="--backbone resnet50 is a timm model but not a Vision Transformer"):
        check_backbone_options("resnet50", 224)
    with pytest.raises(ValueError, match=r"--size 20 is not a multiple of .* patch size 14.*pass --size 14 or --size 28"):
        check_backbone_options("dinov2_vits14", 20)
    with pytest.raises(ValueError, match=r"--size 10 .*pass --size 14$"):
        check_backbone_options("dinov2_vits14", 10)
    with pytest.raises(ValueError, match="--token-pool 3 does not divide the 4x4 patch grid"):
        check_backbone_options("dinov2_vits14", 56, token_pool=3)
    assert check_backbone_options("dinov2_vitg14_reg", 28) == 2
    assert check_backbone_options("vit_base_patch16_clip_224.openai", 224, token_pool=2) == 14


def _fake_hub_cache(root: Path, repo: str, filename: str) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / filename).write_bytes(b"weights")


def test_pretrained_weights_fail_fast_when_neither_cache_nor_hub_has_them(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []
    monkeypatch.setattr("spool.backbone.hub_reachable", lambda endpoint: asked.append(endpoint) or False)
    with pytest.raises(WeightsError, match="holds no weights for dinov2_vits14 .* cannot be reached.*--weights PATH"):
        check_pretrained_available("dinov2_vits14")
    assert asked == [constants.ENDPOINT]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE is set"):
        check_pretrained_available("dinov2_vits14")
    # reachable hub, nothing cached: the download may start
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("spool.backbone.hub_reachable", lambda endpoint: True)
    check_pretrained_available("dinov2_vits14")
    # cached weights need no network, offline or not
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "hub", "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors")
    check_pretrained_available("dinov2_vits14")
    with pytest.raises(WeightsError):
        check_pretrained_available("dinov2_vitb14")  # another model's weights are not in that cache


def test_load_backbone_itself_fails_fast_offline_so_predict_does_too(tmp_path, monkeypatch):
    # spool predict loads a run's hub weights through load_backbone, not through extract's checks
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("spool.backbone.hub_reachable", lambda endpoint: False)
    real = timm.create_model

    def no_download(*args, pretrained=False, **kwargs):
        assert not pretrained, "the hub download was tried (a minute of retries offline)"
        return real(*args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr("spool.backbone.timm.create_model", no_download)
    with pytest.raises(WeightsError, match="holds no weights for dinov2_vits14 .* cannot be reached"):
        load_backbone("dinov2_vits14", weights="pretrained", image_size=28)


def test_hub_reachable_opens_a_connection(monkeypatch):
    import socket

    monkeypatch.setattr("urllib.request.getproxies", dict)

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub_reachable(f"http://127.0.0.1:{port}", timeout_s=2)
    assert not hub_reachable(f"http://127.0.0.1:{port}", timeout_s=2)  # closed now


def test_hub_reachable_leaves_the_answer_to_a_proxy(monkeypatch):
    monkeypatch.setattr("urllib.request.getproxies", lambda: {"http": "http://proxy:3128"})
    assert hub_reachable("http://127.0.0.1:9", timeout_s=1)  # port 9 is closed, but a proxy may reach the hub
