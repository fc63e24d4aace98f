from __future__ import annotations

import pytest
import torch

from spool.baselines import AttentiveProbe, AttentiveProbeConfig, MeanLinearConfig, MeanLinearHead
from spool.checkpoint import HEAD_INPUTS, build_head

B, T, L, D, C = 3, 5, 4, 12, 7


def scrambled(probe):
    """V-JEPA's init (std 0.02) makes logits ~1e-3; O(1) weights make differences visible."""
    with torch.no_grad():
        for p in probe.parameters():
            p.normal_(0, 0.5)
    return probe.eval()


def test_mean_linear_is_a_linear_map_of_the_time_mean():
    torch.manual_seed(0)
    head = MeanLinearHead(MeanLinearConfig(in_dim=D, num_classes=C, norm="none"))
    cls = torch.randn(B, T, D)
    expected = cls.mean(1) @ head.linear.weight.T + head.linear.bias
    torch.testing.assert_close(head(cls), expected)
    # blind to frame order by construction: the property the toy end-to-end test relies on
    torch.testing.assert_close(head(cls.flip(1)), head(cls))


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_mean_linear_norms_normalise_the_features(norm):
    head = MeanLinearHead(MeanLinearConfig(in_dim=D, num_classes=C, norm=norm)).train()
    cls = 100 + 50 * torch.randn(8, T, D)
    normed = head.norm(cls.mean(1))
    axis = 0 if norm == "batchnorm" else 1  # batchnorm: over the batch; layernorm: over channels
    torch.testing.assert_close(normed.mean(axis), torch.zeros(normed.shape[1 - axis]), atol=1e-4, rtol=0)
    assert head(cls).shape == (8, C)


def test_mean_linear_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm"):
        MeanLinearConfig(in_dim=D, num_classes=C, norm="rms")


def test_attentive_probe_attends_over_all_tokens_and_ignores_order_without_embedding():
    torch.manual_seed(0)
    probe = scrambled(AttentiveProbe(AttentiveProbeConfig(in_dim=D, num_classes=C, num_frames=T, num_heads=3)))
    x = torch.randn(B, T, L, D)
    out = probe(x)
    assert out.shape == (B, C)
    # a set function of the T*L tokens: any permutation of frames and tokens gives the same logits
    perm = torch.randperm(T * L)
    shuffled = x.reshape(B, T * L, D)[:, perm].reshape(B, T, L, D)
    torch.testing.assert_close(probe(shuffled), out, atol=1e-5, rtol=1e-5)
    # ... but every token matters
    y = x.clone()
    y[:, -1, -1] = 3 * torch.randn(B, D)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(probe(y), out, atol=1e-3)


def test_attentive_probe_with_temporal_embedding_sees_frame_order():
    torch.manual_seed(0)
    probe = AttentiveProbe(
        AttentiveProbeConfig(in_dim=D, num_classes=C, num_frames=T, num_heads=3, temporal_embedding=True)
    ).eval()
    x = torch.randn(B, T, L, D)
    assert (probe.frame_embed == 0).all()  # zero at init: starts as the plain V-JEPA probe
    torch.testing.assert_close(probe(x.flip(1)), probe(x), atol=1e-6, rtol=1e-5)
    scrambled(probe)
    assert not torch.allclose(probe(x.flip(1)), probe(x), atol=1e-3)


def test_attentive_probe_matches_a_hand_written_cross_attention():
    torch.manual_seed(0)
    probe = scrambled(AttentiveProbe(AttentiveProbeConfig(in_dim=D, num_classes=C, num_frames=T, num_heads=1)))
    x = torch.randn(B, T, L, D)
    blk = probe.block
    kv = blk.norm1(x.reshape(B, T * L, D))
    q = blk.xattn.q(probe.query.expand(B, -1, -1))
    k, v = blk.xattn.kv(kv).split(D, dim=-1)
    attn = torch.softmax(q @ k.transpose(1, 2) / D**0.5, dim=-1)  # (B, 1, T*L)
    h = probe.query + blk.xattn.proj(attn @ v)
    h = h + blk.mlp(blk.norm2(h))
    torch.testing.assert_close(probe(x), probe.linear(h.squeeze(1)), atol=1e-5, rtol=1e-5)


def test_heads_declare_their_inputs_and_rebuild_from_dicts():
    assert HEAD_INPUTS == {"spool": ("patches",), "full": ("patches",), "factorized": ("patches",),
                           "mean-linear": ("cls",), "attentive-probe": ("patches",)}  # fmt: skip
    head = build_head("mean-linear", {"in_dim": D, "num_classes": C, "norm": "layernorm"})
    assert isinstance(head, MeanLinearHead) and head.cfg.norm == "layernorm"
    with pytest.raises(ValueError, match="divisible"):
        AttentiveProbeConfig(in_dim=10, num_classes=C, num_frames=T, num_heads=3)
