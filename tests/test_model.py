import dataclasses
import logging

import pytest
import torch

from spool.model import HeadConfig, SpoolHead, resolve_backend

TINY = HeadConfig(in_dim=12, num_frames=4, num_tokens=3, num_classes=5, dim=24, depth=2, num_heads=4,
                  num_lookahead_heads=2, local_frame_range=1)


def tiny(**overrides):
    return dataclasses.replace(TINY, **overrides)


def patches(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_frames, cfg.num_tokens, cfg.in_dim, generator=g)


@pytest.mark.parametrize("context", [True, False])
def test_forward_shape_and_gradients_reach_every_parameter(context):
    cfg = tiny(context_frames=context)
    model = SpoolHead(cfg, device="cpu")
    logits = model(patches(cfg, batch=3))
    assert logits.shape == (3, cfg.num_classes)
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_no_context_variant_has_no_context_frames_and_narrower_pooling():
    with_ctx = SpoolHead(tiny(), device="cpu")
    without = SpoolHead(tiny(context_frames=False), device="cpu")
    names = {n for n, _ in without.named_parameters()}
    assert "framing.start" not in names and "framing.end" not in names
    assert with_ctx.pool.classifier.in_features == 2 * 24
    assert without.pool.classifier.in_features == 24


def test_dim_defaults_to_in_dim():
    cfg = tiny(dim=None, in_dim=8)
    assert cfg.width == 8
    assert SpoolHead(cfg, device="cpu")(patches(cfg)).shape == (2, 5)


def test_param_count_grows_with_depth():
    counts = [SpoolHead(tiny(depth=d), device="cpu").param_count() for d in (1, 2, 3)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[2] - counts[1] == counts[1] - counts[0]  # each block adds the same parameters


def test_backend_selection():
    assert resolve_backend("auto", "cpu", needs_grad=True) == "blocked"
    assert resolve_backend("auto", "cuda", needs_grad=True) == "flex"
    assert resolve_backend("dense", "cpu", needs_grad=True) == "dense"
    assert resolve_backend("flex", "cpu", needs_grad=False) == "flex"
    with pytest.raises(ValueError, match="no backward"):
        resolve_backend("flex", "cpu", needs_grad=True)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("sparse", "cpu", needs_grad=True)


def test_backend_is_said_once_when_the_model_is_built(caplog):
    with caplog.at_level(logging.INFO, logger="spool.model"):
        model = SpoolHead(tiny(), device="cpu")
        model(patches(TINY))
        model(patches(TINY))
    assert model.backend == "blocked"
    assert [r.getMessage() for r in caplog.records if "backend" in r.getMessage()] == [
        "SpoolHead attention backend: blocked (requested 'auto', device cpu)"
    ]


def test_backends_give_the_same_logits():
    x = patches(TINY)
    out = {}
    for backend, needs_grad in (("blocked", True), ("dense", True), ("flex", False)):
        torch.manual_seed(0)
        model = SpoolHead(tiny(backend=backend), device="cpu", needs_grad=needs_grad)
        with torch.no_grad():
            out[backend] = model(x)
    torch.testing.assert_close(out["blocked"], out["dense"])
    torch.testing.assert_close(out["flex"], out["dense"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_lookahead_heads=5), "num_lookahead_heads=5 must be between 0 and num_heads=4"),
        (dict(num_lookahead_heads=-1), "num_lookahead_heads=-1"),
        (dict(dim=30), "dim=30 is not divisible by num_heads=4"),
        (dict(dim=None, in_dim=10), "dim=10 is not divisible by num_heads=4"),
        (dict(backend="sparse"), "backend='sparse' is unknown"),
        (dict(local_frame_range=-1), "local_frame_range must be >= 0"),
        (dict(num_frames=0), "num_frames must be >= 1"),
        (dict(dropout=1.0), "dropout must be in"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny(**overrides)


def test_num_lookback_heads():
    assert tiny(num_heads=6, dim=24, num_lookahead_heads=2).num_lookback_heads == 4


def test_wrong_input_shape_is_explained():
    model = SpoolHead(tiny(), device="cpu")
    with pytest.raises(ValueError, match=r"T=4, L=3, D_in=12"):
        model(torch.randn(2, 5, 3, 12))


def test_tiny_overfit():
    torch.manual_seed(0)
    cfg = tiny(num_classes=4)
    model = SpoolHead(cfg, device="cpu")
    x = patches(cfg, batch=8, seed=1)
    y = torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("num_lookahead_heads", [0, 4])  # lookback-only, lookahead-only
def test_output_depends_on_frame_order(num_lookahead_heads):
    # Zero the temporal embedding so order can only enter through the attention mask.
    cfg = tiny(num_lookahead_heads=num_lookahead_heads, depth=2)
    model = SpoolHead(cfg, device="cpu").eval()
    with torch.no_grad():
        model.framing.time_embed.zero_()
        x = patches(cfg)
        forward, reversed_ = model(x), model(x.flip(1))
    assert not torch.allclose(forward, reversed_, atol=1e-4)

    # Control: with one block the context frames read a permutation-invariant set of frames,
    # so the pooled output cannot see the order (as mean-pooling would not).
    one_block = SpoolHead(dataclasses.replace(cfg, depth=1), device="cpu").eval()
    with torch.no_grad():
        one_block.framing.time_embed.zero_()
        torch.testing.assert_close(one_block(x), one_block(x.flip(1)))


# --- the paper's references: full and factorized space-time attention ----------------------


@pytest.mark.parametrize("attention", ["full", "factorized"])
@pytest.mark.parametrize("context", [True, False])
def test_reference_heads_shapes_and_gradients(attention, context):
    cfg = tiny(attention=attention, context_frames=context)
    model = SpoolHead(cfg, device="cpu")
    logits = model(patches(cfg, batch=3))
    assert logits.shape == (3, cfg.num_classes)
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert model.backend == "sdpa"


def test_reference_heads_ignore_the_head_split_and_the_range():
    # values a Spool head would refuse are not read by the references
    SpoolHead(tiny(attention="full", num_lookahead_heads=9, local_frame_range=-1), device="cpu")
    with pytest.raises(ValueError, match="attention='sparse' is unknown"):
        tiny(attention="sparse")


def test_full_head_equals_the_dense_backend_with_an_all_true_mask(monkeypatch):
    import spool.attention

    cfg = tiny()
    full = SpoolHead(dataclasses.replace(cfg, attention="full"), device="cpu").eval()
    dense = SpoolHead(dataclasses.replace(cfg, backend="dense"), device="cpu").eval()
    dense.load_state_dict(full.state_dict())  # same parameter names: same weights
    S = (cfg.num_frames + 2) * cfg.num_tokens
    monkeypatch.setattr(spool.attention, "token_mask", lambda *a, **k: torch.ones(cfg.num_heads, S, S, dtype=torch.bool))
    x = patches(cfg)
    with torch.no_grad():
        torch.testing.assert_close(full(x), dense(x))
        monkeypatch.undo()  # and the Spool rule does change the result
        assert not torch.allclose(full(x), dense(x))


def _reach(block, x, frame, pos, L):
    """(F, L) bool: which tokens of ``block``'s output change when input token (frame, pos) does."""
    y = x.clone()
    y[0, frame * L + pos] += torch.randn(x.shape[-1], dtype=x.dtype)  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        changed = (block(y) - block(x)).abs().amax(-1) > 1e-12  # (1, S), in float64
    return changed.view(-1, L)


@pytest.mark.parametrize("context", [True, False])
def test_factorized_block_mixes_within_a_frame_then_along_a_position(context):
    from spool.model import FactorizedBlock

    cfg = tiny(attention="factorized", context_frames=context)
    F, L = cfg.num_frames + 2 * context, cfg.num_tokens
    x = torch.randn(1, F * L, cfg.width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    frame, pos = 2, 1
    own_frame = torch.zeros(F, L, dtype=torch.bool)
    own_frame[frame] = True
    own_position = torch.zeros(F, L, dtype=torch.bool)
    own_position[:, pos] = True

    torch.manual_seed(0)
    block = FactorizedBlock(cfg).double().eval()
    # the whole block: within the frame, then along every position of that frame: every token
    assert _reach(block, x, frame, pos, L).all()
    # its sublayers alone (the others' output projections zeroed)
    space_only, time_only = FactorizedBlock(cfg).double().eval(), FactorizedBlock(cfg).double().eval()
    space_only.load_state_dict(block.state_dict())
    time_only.load_state_dict(block.state_dict())
    with torch.no_grad():
        for b, off in ((space_only, b"time"), (time_only, b"space")):
            attn = b.time_attn if off == b"time" else b.space_attn
            for lin in (attn.proj, b.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    assert torch.equal(_reach(space_only, x, frame, pos, L), own_frame)  # the L tokens of its frame
    assert torch.equal(_reach(time_only, x, frame, pos, L), own_position)  # its position in all F frames


def test_checkpoint_head_name_and_attention_must_agree():
    from spool.checkpoint import CheckpointError, build_head

    assert build_head("full", dataclasses.asdict(tiny(attention="full"))).cfg.attention == "full"
    with pytest.raises(CheckpointError, match="must agree"):
        build_head("factorized", dataclasses.asdict(tiny()))
    legacy = {k: v for k, v in dataclasses.asdict(tiny()).items() if k != "attention"}  # written before attention
    assert build_head("spool", legacy).cfg.attention == "spool"


# ---- reading motion: spatial embedding, local correlation, spatial window --------------------


def test_local_correlation_by_hand():
    """Token p of frame t gets cos(x[t, p], x[t + tau, p + shift]) for each tau and shift; zero where
    the frame or the position falls outside the clip."""
    from spool.model import LocalCorrelation

    corr = LocalCorrelation(dim=2, num_tokens=4, frames=1, correlation_range=1, token_norm=False, moments=False)  # 2x2 grid
    x = torch.randn(1, 2, 4, 3, generator=torch.Generator().manual_seed(0))
    captured = {}
    corr.norm.register_forward_hook(lambda m, inp, out: captured.setdefault("raw", inp[0]))
    corr.eval()(x)
    raw = captured["raw"].view(1, 2, 4, -1)  # (B, T, L, 2 offsets * 9 shifts), offsets (-1, +1)
    z = torch.nn.functional.normalize(x, dim=-1)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for t, tau_slot, tau in ((0, 1, 1), (1, 0, -1)):
        for p in range(4):
            for s, (dy, dx) in enumerate(shifts):
                row, col = p // 2 + dy, p % 2 + dx
                expected = 0.0
                if 0 <= row < 2 and 0 <= col < 2:
                    expected = float(z[0, t, p] @ z[0, t + tau, row * 2 + col])
                assert float(raw[0, t, p, tau_slot * 9 + s]) == pytest.approx(expected, abs=1e-6)
    # the offsets that leave the clip are zero: frame 0 has no frame -1, frame 1 no frame 2
    assert raw[0, 0, :, :9].abs().max() == 0 and raw[0, 1, :, 9:].abs().max() == 0


def test_local_correlation_token_norm_and_moments_by_hand():
    """token_norm: a token's cosines to one frame, standardised over the neighbours inside the
    frame (outside: zero); moments: those numbers again times the token's column, then its row,
    in [-1, 1] from the centre of the grid."""
    from spool.model import LocalCorrelation

    x = torch.randn(1, 2, 9, 5, generator=torch.Generator().manual_seed(1))  # 3x3 grid
    plain = LocalCorrelation(dim=2, num_tokens=9, frames=1, correlation_range=1, token_norm=False, moments=False)
    both = LocalCorrelation(dim=2, num_tokens=9, frames=1, correlation_range=1)
    seen = {}
    plain.norm.register_forward_hook(lambda m, inp, out: seen.setdefault("plain", inp[0].view(2, 9, 18)))
    both.norm.register_forward_hook(lambda m, inp, out: seen.setdefault("both", inp[0].view(2, 9, 54)))
    plain.eval()(x), both.eval()(x)
    cos, got = seen["plain"], seen["both"]
    columns, rows = [-1.0, 0.0, 1.0] * 3, [-1.0] * 3 + [0.0] * 3 + [1.0] * 3
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    t, slot = 0, 1  # frame 0 to frame 1 (offset +1)
    for p in range(9):
        inside = [s for s, (dy, dx) in enumerate(shifts) if 0 <= p // 3 + dy < 3 and 0 <= p % 3 + dx < 3]
        values = torch.stack([cos[t, p, slot * 9 + s] for s in inside])
        standard = (values - values.mean()) / (values.var(unbiased=False) + 1e-4).sqrt()
        for s in range(9):
            expected = float(standard[inside.index(s)]) if s in inside else 0.0
            assert float(got[t, p, slot * 9 + s]) == pytest.approx(expected, abs=1e-5)
            assert float(got[t, p, 18 + slot * 9 + s]) == pytest.approx(expected * columns[p], abs=1e-5)
            assert float(got[t, p, 36 + slot * 9 + s]) == pytest.approx(expected * rows[p], abs=1e-5)
    assert got[0, :, :9].abs().max() == 0  # frame 0 has no frame -1, normalised or not


def test_motion_options_build_train_and_count_their_parameters():
    cfg = tiny(num_tokens=4, spatial_embedding=True, correlation_range=1, correlation_frames=1, spatial_range=0)
    model = SpoolHead(cfg, device="cpu")
    names = {n for n, _ in model.named_parameters()}
    assert {"framing.space_embed", "framing.correlation.proj.weight"} <= names
    model(patches(cfg, batch=3)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    plain = SpoolHead(tiny(num_tokens=4), device="cpu")
    # + the (L, dim) spatial embedding + Linear(3 x (2 offsets x 9 shifts) = 54 features, dim)
    assert model.param_count() == plain.param_count() + 4 * 24 + (54 + 1) * 24


def test_the_spatial_window_changes_what_a_token_sees():
    """With r = 0 a clip token's output does not move when another position of another clip
    frame changes; without the window it does."""
    torch.manual_seed(0)
    for r, moves in ((0, False), (None, True)):
        cfg = tiny(num_tokens=4, depth=1, spatial_range=r, context_frames=False)
        model = SpoolHead(cfg, device="cpu").eval()
        x = patches(cfg, batch=2)
        y = x.clone()
        y[:, 1, 3] += 5.0  # frame 1, position 3
        a = model.framing(x)
        b = model.framing(y)
        out_a, out_b = model.blocks[0](a), model.blocks[0](b)  # (B, T*L, dim)
        token = 0 * cfg.num_tokens + 0  # frame 0, position 0: frame 1 is in its lookahead window
        assert (not torch.allclose(out_a[:, token], out_b[:, token])) == moves


@pytest.mark.parametrize("overrides,message", [
    (dict(spatial_range=-1), "spatial_range must be >= 0"),
    (dict(spatial_range=1), "L = 3 tokens is not a square"),
    (dict(correlation_range=1, correlation_frames=4), "correlation_frames=4 must be between 1 and"),
    (dict(correlation_range=-2), "correlation_range must be >= 0"),
    (dict(num_tokens=4, correlation_range=0), "needs two positions or more: correlation_range=0"),
    (dict(num_tokens=1, correlation_range=1), "needs two positions or more: correlation_range=1, num_tokens=1"),
])  # fmt: skip
def test_motion_option_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)
