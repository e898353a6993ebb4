"""Tier 2: every Triton kernel against an fp64 ground truth, outputs and all gradients, fp32 and bf16, odd
shapes. The kernel's error may not exceed the plain-PyTorch reference's error (in the same dtype) plus a
small tolerance. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1); on a GPU for real."""
import pytest
import torch

import kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def run(fn, inputs, grad_seed=0):
    """Output and gradients of every floating input, for a random upstream gradient."""
    xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*xs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(out.device)
    (out.double() * g).sum().backward()
    return [out.detach().double()] + [x.grad.double() if x.grad is not None else None for x in xs]


def check(kernel, ref, inputs, dtype):
    """|kernel - truth| <= |ref - truth| + tol * max|truth|, elementwise, for the output and every gradient."""
    truth = run(ref, [t.double() if t.is_floating_point() else t for t in inputs])
    got_ref = run(ref, [t.to(dtype) if t.is_floating_point() else t for t in inputs])
    got = run(kernel, [t.to(dtype) if t.is_floating_point() else t for t in inputs])
    for i, (t, r, k) in enumerate(zip(truth, got_ref, got)):
        if t is None:
            continue
        assert k is not None, f"tensor {i}: no gradient from the kernel"
        bound = (r - t).abs() + TOL[dtype] * t.abs().max().clamp(min=1e-6)
        excess = ((k - t).abs() - bound).max().item()
        assert excess <= 0, f"tensor {i}: kernel error exceeds reference error by {excess:.3e}"


def randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(dtype, offset):
    x, w = randn(3, 123, 77), randn(77, seed=1, scale=0.2) + (0.0 if offset else 1.0)
    check(lambda a, b: kernels.rms_norm_triton(a, b, 1e-6, offset),
          lambda a, b: kernels.rms_norm_ref(a, b, 1e-6, offset), [x, w], dtype)


def test_rms_norm_frozen_weight_gets_no_gradient():
    x, w = randn(5, 33).requires_grad_(), randn(33)
    kernels.rms_norm_triton(x, w, 1e-6).sum().backward()
    assert w.grad is None and x.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [16, 8])  # full and partial rotary
def test_rope(dtype, rot):
    B, H, T, D = 2, 3, 7, 16
    x = randn(B, T, H, D).transpose(1, 2)  # the model's [B, H, T, D] view of a [B, T, H, D] projection
    pos = torch.arange(T, device=DEV).expand(B, T).float()
    freqs = pos[..., None] * kernels.rope_inv_freq(rot, 10000.0, None).to(DEV)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    check(lambda a: kernels.rope_triton(a, cos, sin), lambda a: kernels.rope_ref(a, cos.to(a.dtype), sin.to(a.dtype)),
          [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_act(dtype, act):
    g, u = randn(3, 123, 45, scale=2.0), randn(3, 123, 45, seed=1)
    check(lambda a, b: kernels.gated_act_triton(a, b, act), lambda a, b: kernels.gated_act_ref(a, b, act), [g, u], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", [None, 30.0])
def test_linear_cross_entropy(dtype, cap):
    N, C, V = 41, 64, 32000 + 7
    h, w = randn(N, C), randn(V, C, seed=1, scale=0.1)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2)).to(DEV)
    y[::5] = -100  # untrained tokens
    check(lambda a, b: kernels.linear_cross_entropy_triton(a, b, y, cap)[None],
          lambda a, b: kernels.linear_cross_entropy_ref(a, b, y, cap)[None], [h, w], dtype)
