"""Every attention backend against the dense reference, on random inputs."""

import itertools

import pytest
import torch

from spool.attention import ATTENTION, blocked_attention, dense_attention, flex_attention

H, HD, B = 3, 8, 2
# (T, k): T in {1, 2, 3, 5, 8}, k in {0, 1, 2, 4}, including T < k.
SHAPES = [(1, 0), (1, 2), (2, 1), (2, 4), (3, 0), (3, 2), (5, 1), (5, 4), (8, 2), (8, 0)]
SPLITS = [0, 1, 3]  # lookahead heads out of 3: all-lookback, mixed, all-lookahead
CASES = list(itertools.product(SHAPES, SPLITS, [True, False], [5, 16]))


def rule(T, L, k, na, context):
    return dict(num_frames=T, num_tokens=L, local_frame_range=k, num_lookahead_heads=na, context_frames=context)


def random_qkv(T, L, context, seed, dtype=torch.float64):
    S = (T + 2 if context else T) * L
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, HD, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("shape,na,context,L", CASES)
def test_blocked_equals_dense_outputs_and_gradients(shape, na, context, L):
    T, k = shape
    seed = hash((T, k, na, context, L)) % 2**31
    kw = rule(T, L, k, na, context)
    q, k_, v = random_qkv(T, L, context, seed)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=q.dtype)

    ref = dense_attention(q, k_, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k_, v), grad_out)
    out = blocked_attention(q, k_, v, **kw)
    grads = torch.autograd.grad(out, (q, k_, v), grad_out)

    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_blocked_counts_duplicate_window_frames_once():
    # T=2, k=4: the lookback window i-4..i reaches C_start (frame 0) and below; if frame 0 were
    # gathered twice its keys would get double weight. With v = one-hot per frame the output
    # is exactly the attention weight each key frame receives.
    T, L, k = 2, 1, 4
    q = torch.zeros(1, 1, T + 2, 4, dtype=torch.float64)  # equal scores: uniform weights
    kk = torch.zeros_like(q)
    v = torch.eye(T + 2, dtype=torch.float64)[None, None]  # (1, 1, F, F)
    out = blocked_attention(q, kk, v, **rule(T, L, k, 0, True))[0, 0]
    # Frame 1 (row 1) sees {C_s, 1}; frame 2 sees {C_s, 1, 2}: uniform over each set.
    torch.testing.assert_close(out[1], torch.tensor([1 / 2, 1 / 2, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(out[2], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0], dtype=torch.float64))


@pytest.mark.parametrize("shape,na,context,L", CASES[::3])
def test_flex_forward_equals_dense_on_cpu(shape, na, context, L):
    # torch 2.14.1 runs flex_attention's forward on CPU (eager, unfused) but has no CPU backward.
    T, k = shape
    kw = rule(T, L, k, na, context)
    q, k_, v = random_qkv(T, L, context, seed=T * 100 + k * 10 + na, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k_, v, **kw), dense_attention(q, k_, v, **kw))


def test_flex_refuses_to_train_on_cpu_with_a_clear_message():
    q, k, v = random_qkv(2, 4, True, seed=0, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        flex_attention(q, k, v, **rule(2, 4, 1, 1, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: compiled flex forward and backward")
@pytest.mark.parametrize("context", [True, False])
def test_flex_equals_dense_on_cuda_with_gradients(context):
    T, L, k, na = 5, 16, 2, 1
    kw = rule(T, L, k, na, context)
    q, k_, v = (t.detach().cuda().requires_grad_() for t in random_qkv(T, L, context, seed=3, dtype=torch.float32))
    ref = dense_attention(q, k_, v, **kw)
    out = flex_attention(q, k_, v, **kw)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k_, v), g), torch.autograd.grad(ref, (q, k_, v), g)):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_backend_table_names():
    assert set(ATTENTION) == {"flex", "blocked", "dense"}


@pytest.mark.parametrize("shape,na,context,r", [((1, 0), 0, True, 0), ((3, 1), 1, True, 1), ((5, 2), 3, False, 0),
                                                ((4, 4), 2, True, 1), ((2, 1), 1, False, 2)])  # fmt: skip
def test_every_backend_computes_the_spatial_window(shape, na, context, r):
    T, k = shape
    L = 9  # a 3x3 grid
    kw = dict(rule(T, L, k, na, context), spatial_range=r)
    q, k_, v = random_qkv(T, L, context, seed=T * 10 + r)
    ref = dense_attention(q, k_, v, **kw)
    out = blocked_attention(q, k_, v, **kw)
    grad_out = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    for g, e in zip(torch.autograd.grad(out, (q, k_, v), grad_out), torch.autograd.grad(ref, (q, k_, v), grad_out)):
        torch.testing.assert_close(g, e)
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k_, v, **kw), ref, atol=1e-6, rtol=1e-6)
    # the window is not ignored: it changes the result unless it covers the 3x3 grid (r >= 2)
    unwindowed = dense_attention(q, k_, v, **rule(T, L, k, na, context))
    assert torch.allclose(unwindowed, ref) == (r >= 2)  # (a frame's own tokens are windowed too)
