"""FLOPs against a hand count, the mask's allowed pairs against its table, and the
efficiency numbers a run records."""

from __future__ import annotations

import json

import pytest
from test_data import make_store

from spool.baselines import AttentiveProbeConfig, MeanLinearConfig
from spool.efficiency import PeakMemory, forward_flops
from spool.mask import allowed_pairs
from spool.model import HeadConfig
from spool.train import TrainConfig, train_head

# T=4 frames of L=4 tokens, D_in = dim = 8, 2 heads (hd 4), one block, 3 classes, MLP 4x
T, L, D, H, C = 4, 4, 8, 2, 3
F = T + 2  # with C_start and C_end
S = F * L  # 24 tokens


def tiny(attention):
    return HeadConfig(in_dim=D, num_frames=T, num_tokens=L, num_classes=C, dim=D, depth=1, num_heads=H,
                      num_lookahead_heads=1, local_frame_range=1, attention=attention)  # fmt: skip


def mm(m, k, n):
    """FlopCounterMode's count of an (m, k) @ (k, n) product: 2 per multiply-accumulate."""
    return 2 * m * k * n


# the parts every Spool-family head shares, counted by hand
FRAMING = mm(T * L, D, D)  # input projection of the clip tokens (context frames are parameters)
ATTN_LINEARS = mm(S, D, 3 * D) + mm(S, D, D)  # qkv and output projection
MLP = mm(S, D, 4 * D) + mm(S, 4 * D, D)
POOL = mm(1, 2 * D, C)  # the classifier on [mean C_start, mean C_end]


def test_allowed_pairs_match_the_mask_table():
    # spool.mask's drawing for T=4, k=1: lookback rows C_s..C_e allow 6, 2, 3, 3, 3, 6 frames;
    # lookahead mirrors it; every allowed frame pair is L x L token pairs
    per_group = (6 + 2 + 3 + 3 + 3 + 6) * L * L
    assert allowed_pairs(T, L, 1, H, 1) == 2 * per_group
    assert allowed_pairs(T, L, 1, 4, 3) == 4 * per_group
    assert allowed_pairs(T, L, T, H, 0, context_frames=False) == H * (1 + 2 + 3 + 4) * L * L  # lookback, all past


def test_flops_match_a_hand_count():
    hd = D // H
    spool_core = 4 * hd * allowed_pairs(T, L, 1, H, 1)  # QK^T and AV over the allowed pairs only
    full_core = 4 * hd * H * S * S  # every pair
    space_core = 4 * hd * H * F * L * L  # within each frame
    time_core = 4 * hd * H * L * F * F  # along each position
    assert forward_flops("spool", tiny("spool"), num_frames=T, num_tokens=L) == {
        "flops": FRAMING + ATTN_LINEARS + spool_core + MLP + POOL, "attention_flops": spool_core,
        "attention_counted": "allowed query-key pairs (mask density 0.639)",
    }  # fmt: skip
    assert forward_flops("full", tiny("full"), num_frames=T, num_tokens=L)["flops"] == (
        FRAMING + ATTN_LINEARS + full_core + MLP + POOL
    )
    factorized = forward_flops("factorized", tiny("factorized"), num_frames=T, num_tokens=L)
    assert factorized["flops"] == FRAMING + 2 * ATTN_LINEARS + space_core + time_core + MLP + POOL
    assert factorized["attention_flops"] == space_core + time_core
    # the baselines: one linear; a query cross-attending T*L tokens with a V-JEPA block
    assert forward_flops("mean-linear", MeanLinearConfig(in_dim=D, num_classes=C), num_frames=T, num_tokens=L)[
        "flops"
    ] == mm(1, D, C)
    probe = AttentiveProbeConfig(in_dim=D, num_classes=C, num_frames=T, num_heads=H)
    q, kv, core = mm(1, D, D), mm(T * L, D, 2 * D), 4 * hd * H * T * L
    assert forward_flops("attentive-probe", probe, num_frames=T, num_tokens=L)["flops"] == (
        q + kv + core + mm(1, D, D) + mm(1, D, 4 * D) + mm(1, 4 * D, D) + mm(1, D, C)
    )


def test_the_spool_count_does_not_depend_on_the_backend():
    import dataclasses

    counts = {b: forward_flops("spool", dataclasses.replace(tiny("spool"), backend=b), num_frames=T, num_tokens=L)
              for b in ("dense", "blocked", "flex")}  # fmt: skip
    assert len({c["flops"] for c in counts.values()}) == 1


def test_peak_memory_reads_a_positive_size():
    memory = PeakMemory("cpu")
    got = memory.read()
    assert got["peak_memory_mb"] > 0 and "peak" in got["peak_memory_of"]


@pytest.mark.parametrize("head", ["full", "factorized"])
def test_reference_heads_train_on_cpu_and_record_their_cost(tmp_path, head):
    path = tmp_path / "feats.zarr"
    make_store(path, num_videos=10, num_classes=2, T=4, L=4, D=8, signal=2.0).close()
    cfg = TrainConfig(store=str(path), out=str(tmp_path / head), head=head, depth=1, num_heads=2, dim=8, epochs=2,
                      batch_size=4, workers=0, lr=3e-3, device="cpu")  # fmt: skip
    result = train_head(cfg, progress=False)
    assert result.config["head_config"]["attention"] == head
    metrics = json.loads((tmp_path / head / "metrics.json").read_text())
    eff = metrics["efficiency"]
    assert eff["params"] > 0 and eff["flops"] > eff["attention_flops"] > 0
    assert eff["train_clips_per_s"] > 0 and eff["eval_videos_per_s"] > 0 and eff["peak_memory_mb"] > 0
    assert all(e["eval_videos_per_s"] > 0 for e in metrics["epochs"])
