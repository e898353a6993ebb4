"""Tier 2: every Triton kernel against an fp64 ground truth, outputs and all gradients, fp32 and bf16, odd
shapes. The kernel's error may not exceed the plain-PyTorch reference's error (in the same dtype) plus a
small tolerance. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1); on a GPU for real."""
import weakref

import pytest
import torch
import torch.nn.functional as F

import kernels
import memory
import model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (on the CPU the Triton interpreter's bf16 runs join the slow tier: the fast one checks each kernel in fp32)
BF16 = torch.bfloat16 if torch.cuda.is_available() else pytest.param(torch.bfloat16, marks=pytest.mark.slow)
DTYPES = [torch.float32, BF16]
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
    within(truth, got_ref, got, dtype)


def within(truth, got_ref, got, dtype):
    for i, (t, r, k) in enumerate(zip(truth, got_ref, got)):
        if t is None:
            continue
        assert k is not None, f"tensor {i}: no gradient from the kernel"
        t, r, k = t.double(), r.double(), k.double()
        bound = (r - t).abs() + TOL[dtype] * t.abs().max().clamp(min=1e-6)
        excess = ((k - t).abs() - bound).max().item()
        assert excess <= 0, f"tensor {i}: kernel error exceeds reference error by {excess:.3e}"


def randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(dtype, offset):
    x, w = randn(3, 41, 77), randn(77, seed=1, scale=0.2) + (0.0 if offset else 1.0)
    check(lambda a, b: kernels.rms_norm_triton(a, b, 1e-6, offset),
          lambda a, b: kernels.rms_norm_ref(a, b, 1e-6, offset), [x, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm(dtype):
    """Qwen3.5's gated norm, (w * rmsnorm(x)) * silu(z), per head of 128 (and an odd width): output and the
    gradients of x, z and w against fp64 truth, no worse than the PyTorch form."""
    for shape in ((2, 9, 3, 128), (37, 77)):
        x, z = randn(*shape, scale=2.0), randn(*shape, seed=2, scale=3.0)
        w = randn(shape[-1], seed=1, scale=0.2) + 1.0
        check(lambda a, b, c: kernels.gated_rms_norm_triton(a, b, c, 1e-6),
              lambda a, b, c: kernels.gated_rms_norm_ref(a, b, c, 1e-6), [x, z, w], dtype)


def test_rms_norm_frozen_weight_gets_no_gradient():
    x, w = randn(5, 33).requires_grad_(), randn(33)
    kernels.rms_norm_triton(x, w, 1e-6).sum().backward()
    assert w.grad is None and x.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype):
    x, w, b = randn(3, 41, 77, scale=2.0) + 0.5, randn(77, seed=1, scale=0.2) + 1.0, randn(77, seed=2, scale=0.1)
    check(lambda a, c, d: kernels.layer_norm_triton(a, c, d, 1e-5),
          lambda a, c, d: kernels.layer_norm_ref(a, c, d, 1e-5), [x, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot,D", [(16, 16), (8, 16), (12, 20)])  # full, partial, a non-power-of-two rotation
def test_rope(dtype, rot, D):
    B, H, T = 2, 3, 7
    x = randn(B, T, H, D).transpose(1, 2)  # the model's [B, H, T, D] view of a [B, T, H, D] projection
    pos = torch.arange(T, device=DEV).expand(B, T).float()
    freqs = pos[..., None] * model.rope_inv_freq(rot, 10000.0, None).to(DEV)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    check(lambda a: kernels.rope_triton(a, cos, sin), lambda a: kernels.rope_ref(a, cos.to(a.dtype), sin.to(a.dtype)),
          [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_act(dtype, act):
    g, u = randn(3, 123, 45, scale=2.0), randn(3, 123, 45, seed=1)
    check(lambda a, b: kernels.gated_act_triton(a, b, act), lambda a, b: kernels.gated_act_ref(a, b, act),
          [g, u], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,eps", [("relu2", None), ("xielu", -1e-6), ("xielu", -0.3)])
def test_plain_act(dtype, act, eps):
    """relu^2 and xIELU (odd shapes; values on both sides of 0 and of xIELU's eps, some near 0 where expm1 - x
    cancels): the output, dx, and xIELU's four parameters' gradients (partial sums per program). eps: Apertus's,
    and one wide enough that many x sit between it and 0 (where min(x, eps) holds eps)."""
    x = torch.cat([randn(3, 123, 45, scale=3.0).flatten(), randn(700, seed=5, scale=1e-3)]).view(5, -1)
    if act == "relu2":
        return check(kernels.relu2_triton, kernels.relu2_ref, [x], dtype)
    params = [randn(1, seed=2) + 0.5, randn(1, seed=3) - 0.5, torch.tensor(0.5, device=DEV),
              torch.tensor(eps, device=DEV)]  # alpha_p, alpha_n, beta, eps (Apertus starts at beta 0.5)
    check(kernels.xielu_triton, kernels.xielu_ref, [x, *params], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,bias,docs,silu", [(4, True, True, True), (3, False, False, False), (1, True, True, False),
                                              (4, False, True, False), (4, False, True, True), (3, True, False, True)])
def test_causal_conv1d(dtype, L, bias, docs, silu):
    """The causal depthwise convolution (LFM2; Gated DeltaNet and Mamba2 with a SiLU after it, recomputed in the
    backward): odd lengths and channel counts past a block, documents starting inside rows and at a block edge (32
    rows), with and without a bias: output, dv, dw, dbias."""
    B, T, C = 2, 45, 70
    v, w = randn(B, T, C), randn(C, L, seed=1)
    d = None
    if docs:
        starts = torch.zeros(B, T, dtype=torch.long, device=DEV)
        starts[0, 7], starts[0, 32], starts[1, 33], starts[1, 44] = 1, 1, 1, 1
        d = starts.cumsum(1)
    b = [randn(C, seed=2)] if bias else []
    check(lambda v, w, *b: kernels.causal_conv1d_triton(v, w, b[0] if b else None, d, silu),
          lambda v, w, *b: kernels.causal_conv1d_ref(v, w, b[0] if b else None, d, silu), [v, w, *b], dtype)


def flat(fn):
    """fn's tuple of tensors as one flat tensor (check compares one output)."""
    return lambda *a: torch.cat([t.flatten() for t in fn(*a)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_w,has_s0", [(True, False), (False, True)])
@pytest.mark.parametrize("shape", [(2, 3, 20, 24, 70), (1, 2, 40, 100, 70)])
def test_chunk_scan(dtype, has_w, has_s0, shape):
    """The chunk-to-chunk recurrence of the chunked delta rule (with W) and of the SSD scan (without): D, S_in and
    the final state, and the gradients of U, W, K, the decays and the incoming state; chunk, key and value sizes
    that are not powers of two, values past one block of columns (the second shape: Qwen3.5's 64 x 128 blocks,
    whose backward takes narrower column blocks than its forward)."""
    B, N, C, KD, V = shape
    U, W, K, g, S0 = randn(B, N, C, V), randn(B, N, C, KD, seed=1, scale=0.1), randn(B, N, C, KD, seed=2, scale=0.1), \
        randn(B, N, seed=3).sigmoid(), randn(B, KD, V, seed=4)
    fix = lambda fn: lambda U, K, g, *rest: fn(U, rest[0] if has_w else None, K, g,  # noqa: E731
                                               rest[-1] if has_s0 else None)
    check(flat(fix(kernels.chunk_scan_triton)), flat(fix(kernels.chunk_scan_ref)),
          [U, K, g] + [W] * has_w + [S0] * has_s0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_norm(dtype):
    """Gated DeltaNet's q and k normalised (and scaled) through the RMSNorm kernels, in fp32 from either dtype; the
    input a strided slice, as the conv's output is."""
    x = randn(2, 37, 3 * 24, scale=3.0)[..., 24:48]
    check(lambda a: kernels.l2_norm_triton(a, 0.3), lambda a: kernels.l2_norm_ref(a, 0.3), [x], dtype)
    assert kernels.l2_norm_triton(x.to(dtype)).dtype == torch.float32


def delta_inputs(B, T, H, HK, KD, VD, docs):
    """q, k [B, T, HK, KD] (k of unit length), v [B, T, H, VD], g < 0, beta in (0, 1) [B, T, H], starts [B, T]."""
    k = randn(B, T, HK, KD, seed=1)
    starts = torch.zeros(B, T, dtype=torch.bool, device=DEV)
    if docs:
        starts[0, 9], starts[1 % B, 16], starts[-1, T - 1] = True, True, True
    return [randn(B, T, HK, KD), k / k.norm(dim=-1, keepdim=True), randn(B, T, H, VD, seed=2),
            -randn(B, T, H, seed=3).abs(), randn(B, T, H, seed=4).sigmoid()], starts if docs else None


DELTA_SHAPES = [(2, 37, 2, 1, 24, 20, 16, True)] + [  # (the other two join the slow tier on the CPU: ~10 s)
    pytest.param(s, marks=pytest.mark.slow) if not torch.cuda.is_available() else s
    for s in [(1, 50, 3, 3, 8, 70, 7, False), (1, 64, 2, 1, 40, 24, 64, True)]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DELTA_SHAPES)
def test_delta_prep(dtype, shape):
    """The delta rule's in-chunk preparation (U, W, K_end, gamma_C: the triangular inverse inside), and the gradients
    of k, v, g and beta through it: chunks that are not powers of two and cut the sequence's end, documents starting
    inside a chunk and at its first token, key heads serving 2 (or 1, 3) value heads, values past one column block,
    a whole 64-token chunk."""
    B, T, H, HK, KD, VD, C, docs = shape
    (_, k, v, g, beta), starts = delta_inputs(B, T, H, HK, KD, VD, docs)
    check(flat(lambda *a: kernels.delta_prep_triton(*a, starts, C)), flat(lambda *a: kernels.delta_prep_ref(
        *a, starts, C)), [k, v, g, beta], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DELTA_SHAPES)
def test_chunk_out(dtype, shape):
    """The delta rule's output from the scan's delta and S_in, and the gradients of q, k, g, S_in and delta."""
    B, T, H, HK, KD, VD, C, docs = shape
    (q, k, _, g, _), starts = delta_inputs(B, T, H, HK, KD, VD, docs)
    N = -(-T // C)
    S_in, delta = randn(B * H, N, KD, VD, seed=5), randn(B * H, N, C, VD, seed=6)
    check(lambda *a: kernels.chunk_out_triton(*a[:3], starts, *a[3:]),
          lambda *a: kernels.chunk_out_ref(*a[:3], starts, *a[3:]), [q, k, g, S_in, delta], dtype)


COMPILE_SCAN = """
import json, sys
sys.path.insert(0, ROOT)
import torch, kernels
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
out = []
for mixer, (C, KD, V, has_w) in {"delta rule": (64, 128, 128, True), "ssd": (64, 128, 64, False)}.items():
    if PART != "scan":
        break
    for cap in (90, 80, 89):
        for fn in (kernels._scan_fwd, kernels._scan_bwd):
            U, K = torch.empty(1, 1, C, V, device="meta"), torch.empty(1, 1, C, KD, device="meta")
            _, blk = kernels._ChunkScan.blocks(U, K, backward=fn is kernels._scan_bwd)
            consts = dict(HAS_W=has_w, **blk)
            sig = {a: "constexpr" if a in consts else "i32" if a in ("NB", "N", "C", "KD", "V") else "*fp32"
                   for a in fn.arg_names}
            for stages in kernels.SCAN_DEPTHS[fn is kernels._scan_bwd]:  # (the depths launch_fitting tries)
                k = kernels.triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cap, 32),
                                           options=dict(num_warps=8 if blk["BK"] >= 128 else 4, num_stages=stages))
                out.append([mixer, cap, fn.__name__, stages, k.metadata.shared, "mma" in k.asm["ttgir"]])
for cap in (90, 89) if PART == "in-chunk" else ():  # Qwen3.5's blocks (an A100 has more room than Ada)
    for fn in (kernels._delta_prep_fwd, kernels._delta_prep_bwd, kernels._chunk_out_fwd, kernels._chunk_out_bwd):
        consts = kernels._delta_blocks(torch.empty(0, 128), torch.empty(0, 128), 64, True)
        sig = {a: "constexpr" if a in consts else "i32" if a in ("T", "H", "HK", "C", "N", "KD", "VD") else
               "*i8" if a == "ST" else "*fp32" for a in fn.arg_names}
        for stages in (2, 1):  # (the depths kernels._delta_launch tries)
            k = kernels.triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cap, 32),
                                       options=dict(num_warps=8, num_stages=stages))
            out.append(["delta rule", cap, fn.__name__, stages, k.metadata.shared, "mma" in k.asm["ttgir"]])
            if k.metadata.shared <= LIMIT[cap]:
                break
print(json.dumps(out))
"""


LIMIT = {90: 232_448, 80: 166_912, 89: 101_376}  # bytes of shared memory a block (CUDA's per-GPU maximum)


@pytest.mark.slow
@pytest.mark.parametrize("part", ["scan", "in-chunk"])  # (~1 and ~2 min: each within the GPU tier's time a test)
def test_the_chunk_scan_compiles_for_hopper_ampere_and_ada_within_their_shared_memory(part):
    """The chunk scan's kernels at Qwen3.5's (chunk 64, keys and values 128) and Mamba2's (chunk 64, state 128,
    head 64) blocks, and the delta rule's in-chunk kernels at Qwen3.5's, compiled on this CPU for an H100 (sm_90),
    an A100 (sm_80, the scan only) and an Ada card (sm_89): some pipelining depth tried (kernels.SCAN_DEPTHS,
    _delta_launch's) fits each one's shared memory a block (s27-5 found the backward asking 288 KiB of an H100's 227
    on the GPU), and the products take the tensor cores ("tf32x3")."""
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (a real compile)
    r = subprocess.run([sys.executable, "-c", f"ROOT, PART, LIMIT = {ROOT!r}, {part!r}, {LIMIT!r}" + COMPILE_SCAN],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert rows and {r[2].startswith("_scan") for r in rows} == {part == "scan"}
    for mixer, cap, name, fits in {(m, c, n, min(r[4] for r in rows if r[:3] == [m, c, n]) <= LIMIT[c])
                                   for m, c, n, *_ in rows}:
        assert fits, (mixer, cap, name)
    assert all(r[5] for r in rows), [r for r in rows if not r[5]]  # tensor-core products everywhere


def test_a_scan_whose_pipelining_does_not_fit_the_gpu_runs_less_deep(monkeypatch):
    """launch_fitting: where the backward's 2-deep pipelining asks more shared memory than the GPU has (Triton refuses
    such a launch before it starts), it runs 1 deep with the same gradients, and the next call goes there first."""
    tried = []

    class SmallGPU:  # in front of the real kernel: refuses what a ~100 KiB card would
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, num_stages, **kw):
                tried.append(num_stages)
                if num_stages > 1:
                    raise kernels.triton.runtime.errors.OutOfResources(196_608, 101_376, "shared memory")
                return self.kernel[grid](*args, num_stages=num_stages, **kw)
            return launch
    monkeypatch.setattr(kernels, "_scan_bwd", SmallGPU(kernels._scan_bwd))
    monkeypatch.setattr(kernels, "_STAGES", {})
    leaves = [t.requires_grad_() for t in (randn(2, 3, 20, 70), randn(2, 3, 20, 24, seed=1, scale=0.1),
                                           randn(2, 3, 20, 24, seed=2, scale=0.1), randn(2, 3, seed=3).sigmoid())]
    dD = randn(2, 3, 20, 70, seed=4)
    want = torch.autograd.grad(kernels.chunk_scan_ref(*leaves)[0], leaves, dD)
    for calls in ([2, 1], [2, 1, 1]):
        got = torch.autograd.grad(kernels.chunk_scan_triton(*leaves)[0], leaves, dD)
        assert tried == calls and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mixer", ["delta_rule", "ssd"])
def test_chunk_scan_in_the_mixers(dtype, mixer, monkeypatch):
    """The chunked delta rule (Gated DeltaNet: its in-chunk kernels too, one key head for 3 value heads) and SSD scan
    (Mamba2: the output kernel too, one group of B and C for 3 heads) through the kernels = their token-by-token
    definitions (fp64 truth): output, final state and every gradient, 37 tokens in chunks of 7, documents starting
    inside a chunk and on a chunk edge, an incoming state."""
    import mixers
    B, T, H, dk, dv, chunk = 2, 37, 3, 8, 6, 7
    starts = torch.zeros(B, T, dtype=torch.bool, device=DEV)
    starts[0, 12], starts[1, 7], starts[1, 36] = True, True, True
    if mixer == "delta_rule":
        k = randn(B, T, 1, dk, seed=1)
        inputs = [randn(B, T, 1, dk), k / k.norm(dim=-1, keepdim=True), randn(B, T, H, dv, seed=2),
                  -randn(B, T, H, seed=3).abs(), randn(B, T, H, seed=4).sigmoid(), randn(B, H, dk, dv, seed=5) * 0.1]
        recurrent, chunked = mixers.delta_rule_recurrent, mixers.delta_rule_chunked
        monkeypatch.setattr(kernels, "delta_prep", kernels.delta_prep_triton)
    else:
        inputs = [randn(B, T, H, dv), randn(B, T, H, seed=1).abs() + 0.05, -randn(H, seed=2).abs() - 0.1,
                  randn(B, T, 1, dk, seed=3), randn(B, T, 1, dk, seed=4), randn(B, H, dv, dk, seed=5) * 0.1]
        recurrent, chunked = mixers.ssd_recurrent, mixers.ssd_chunked
    monkeypatch.setattr(kernels, "chunk_scan", kernels.chunk_scan_triton)
    monkeypatch.setattr(kernels, "chunk_out", kernels.chunk_out_triton)
    check(flat(lambda *a: chunked(*a[:-1], starts, a[-1], chunk=chunk)),
          flat(lambda *a: recurrent(*a[:-1], starts, a[-1])), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", [None, 30.0])
# (the Triton rows take ~4 s a case in Triton's CPU interpreter: slow tier; on a GPU they run for real)
@pytest.mark.parametrize("rows_in", [pytest.param("triton", marks=pytest.mark.slow), "torch"])
def test_linear_cross_entropy(dtype, cap, rows_in):
    """The fused loss (its rows in Triton or in PyTorch, ce_rows_torch) vs the reference."""
    fused = kernels.linear_cross_entropy_triton if rows_in == "triton" else kernels.linear_cross_entropy_fused
    N, C, V = 41, 64, 32000 + 7
    h, w = randn(N, C), randn(V, C, seed=1, scale=0.1)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2)).to(DEV)
    y[::5] = -100  # untrained tokens
    check(lambda a, b: fused(a, b, y, cap)[None],
          lambda a, b: kernels.linear_cross_entropy_ref(a, b, y, cap)[None], [h, w], dtype)
    rows = kernels.trained_rows(y)  # found ahead by the caller: the same loss
    assert len(rows) == N - 9 and torch.equal(fused(h, w, y, cap, rows=rows),
                                              fused(h, w, y, cap))
    # rows=False (CUDA graphs): untrained rows go through the kernel and add zero loss and zero gradient
    check(lambda a, b: fused(a, b, y, cap, rows=False)[None],
          lambda a, b: kernels.linear_cross_entropy_ref(a, b, y, cap)[None], [h, w], dtype)
    for fn in (fused, kernels.linear_cross_entropy_ref):
        hh = h.to(dtype).requires_grad_()
        fn(hh, w.to(dtype), y, cap, rows=False).backward()
        assert hh.grad[::5].abs().max() == 0
    b = randn(V, seed=3, scale=0.5)  # a head with a bias (Phi-2): its gradient too
    check(lambda a, c, d: fused(a, c, y, cap, bias=d)[None],
          lambda a, c, d: kernels.linear_cross_entropy_ref(a, c, y, cap, bias=d)[None], [h, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap,bias", [(None, False), (30.0, True)])
@pytest.mark.parametrize("rows_in", [pytest.param("triton", marks=pytest.mark.slow), "torch"])
def test_linear_token_logps(dtype, cap, bias, rows_in, monkeypatch):
    """GRPO's per-token log-probs through the fused head (each row's d loss / d h made in forward, scaled in
    backward by that row's own upstream gradient) vs log_softmax over each chunk's logits (token_logps_ref), fp64
    truth: the values and dh for a random upstream gradient per row, past one 1024-row chunk; without a gradient
    the same values; a trainable head refused."""
    monkeypatch.setattr(kernels, "_triton", lambda t: rows_in == "triton")
    N, C, V = (37 if rows_in == "triton" else 1030), 24, 257  # (the interpreter walks each row: fewer there)
    h, w = randn(N, C), randn(V, C, seed=1, scale=0.3)
    b = randn(V, seed=3, scale=0.5) if bias else None
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2)).to(DEV)

    def head(dt):
        return lambda x: kernels.softcap(F.linear(x, w.to(dt), None if b is None else b.to(dt)), cap)
    check(lambda a: kernels.linear_token_logps(a, w.to(a.dtype), y, cap, None if b is None else b.to(a.dtype)),
          lambda a: kernels.token_logps_ref(a, head(a.dtype), y), [h], dtype)
    with torch.no_grad():
        hd, wd = h.to(dtype), w.to(dtype)
        bd = None if b is None else b.to(dtype)
        assert torch.equal(kernels.linear_token_logps(hd, wd, y, cap, bd),
                           kernels.linear_token_logps(hd.requires_grad_(), wd, y, cap, bd).detach())
    with pytest.raises(ValueError, match="frozen head"):
        kernels.linear_token_logps(h, w.clone().requires_grad_(), y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outs,bias", [((45,), False), ((40, 8, 8), True)], ids=["one", "qkv+bias"])
def test_lora_linear(dtype, outs, bias, monkeypatch):
    """The fused LoRA projections (one or three sharing x, rank 4 and 5) vs autograd through the plain ops:
    outputs and the gradients of x, every A and every B; the frozen W gets none."""
    with kernels.fused(True):  # the fused Function is plain PyTorch: it runs on CPU too
        C, rs = 37, [4, 5, 4][: len(outs)]
        Ws = [randn(o, C, seed=10 + i, scale=0.2) for i, o in enumerate(outs)]
        bs = [randn(o, seed=20 + i) if bias else None for i, o in enumerate(outs)]
        fns = [lambda dt, w=w: w.to(dt) for w in Ws]
        scal = [1.0, 0.5, 4.0][: len(outs)]  # s = 1 casts B without a multiply
        x = randn(3, 41, C, seed=1)
        As = [randn(r, C, seed=30 + i, scale=0.3) for i, r in enumerate(rs)]
        Bs = [randn(o, r, seed=40 + i, scale=0.3) for i, (o, r) in enumerate(zip(outs, rs))]
        n = len(outs)

        def flat(ys):
            return torch.cat([y.reshape(-1) for y in ys])
        check(lambda x, *ab: flat(kernels.lora_linear(x, fns, bs, scal, ab[:n], ab[n:])),
              lambda x, *ab: flat(kernels.lora_linear_ref(x, fns, bs, scal, ab[:n], ab[n:])), [x, *As, *Bs], dtype)


@pytest.mark.parametrize("change", ["fused AdamW", "in place"])
def test_cached_lora_casts_follow_every_change_of_the_adapter(change):
    """memory.py's cast cache (on once memory is imported): after a fused optimizer step (which bumps no version
    counter) or an in-place edit, the fused LoRA path uses the new weights, as the reference does; within a step
    it casts once (the same tensors come back)."""
    C, O, r = 24, 16, 4
    w, x = randn(O, C, seed=1), randn(5, C, seed=2)
    A, B = (randn(r, C, seed=3).requires_grad_(), randn(O, r, seed=4).requires_grad_())
    opt = torch.optim.AdamW([A, B], lr=0.1, fused=True)
    casts = [memory.cached_lora_casts([A], [B], [2.0], torch.float32) for _ in range(2)]
    assert casts[0][0] is casts[1][0]  # cached: one cast per step
    for step in range(3):
        y = kernels.lora_linear(x, [lambda dt: w.to(dt)], [None], [2.0], [A], [B])[0]
        with kernels.fused(False):
            ref = kernels.lora_linear(x, [lambda dt: w.to(dt)], [None], [2.0], [A], [B])[0]
        assert torch.allclose(y, ref, atol=1e-5), step
        if change == "fused AdamW":
            y.sum().backward()
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                B.mul_(1.5)


def test_lora_linear_skipped_value_keeps_every_gradient(monkeypatch):
    """value=False (a recompute whose output only feeds a residual add) gives the same gradients."""
    with kernels.fused(True):
        W, x, A, B = randn(16, 12), randn(5, 12, seed=1), randn(4, 12, seed=2), randn(16, 4, seed=3)
        grads = []
        for value in (True, False):
            xs, a, b = (t.clone().requires_grad_() for t in (x, A, B))
            (y,) = kernels.lora_linear(xs, [lambda dt: W], [None], [2.0], [a], [b], value=value)
            y.backward(torch.ones_like(y))
            grads.append([xs.grad, a.grad, b.grad])
        for g1, g2 in zip(*grads):
            assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_with_manual_backward(dtype, monkeypatch):
    """kernels.linear (full fine-tuning's down_proj) against F.linear: output and the x, W, b gradients;
    with the value skipped (a recompute) the gradients are bit-identical."""
    with kernels.fused(True):
        lin = torch.nn.Linear(123, 45).to(DEV)
        x = randn(3, 7, 123, seed=1)
        check(lambda x, w, b: kernels._Linear.apply(x, w, b, True), torch.nn.functional.linear,
              [x, lin.weight.detach(), lin.bias.detach()], dtype)
        grads, gemms, plain = [], [], torch.nn.functional.linear
        monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: gemms.append(1) or plain(*a))
        for value in (True, False):
            xs = x.to(dtype).requires_grad_()
            m = torch.nn.Linear(123, 45, device=DEV, dtype=dtype)
            m.load_state_dict(lin.state_dict())
            with kernels.hint("recompute"), kernels.value_unused(not value):
                y = kernels.linear(m, xs)
            y.backward(randn(3, 7, 45, seed=2).to(dtype))
            grads.append([xs.grad, m.weight.grad, m.bias.grad])
        assert len(gemms) == 1  # the recompute skipped the forward GEMM
        for g1, g2 in zip(*grads):
            assert torch.equal(g1, g2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_thirty_steps_with_kernels_on_and_off_follow_one_loss_curve(mode, tmp_path, monkeypatch):
    """30 training steps of a small Llama with the kernels on and with the PyTorch references give the same
    loss curve: bf16 on a GPU (every Triton kernel, the fused LoRA path, recompute hints, activation offload);
    fp32 on CPU (the fused LoRA path and recompute hints; Triton kernels only run on CUDA tensors)."""
    from conftest import make_hf_model
    import lora
    import formats
    import quant
    import train
    make_hf_model("llama", tmp_path, hidden_size=128, intermediate_size=256, num_hidden_layers=3, vocab_size=512)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 512, (4, 64), generator=g).to(DEV) for _ in range(6)]
    curves = []
    for on in (False, True):
        with kernels.fused(on):
            q4 = quant.prepare_4bit if mode == "qlora" else None
            m = formats.load_model(str(tmp_path), dtype=dtype, device=DEV, prepare=q4)
            if mode != "full":
                torch.manual_seed(0)
                lora.apply_lora(m, r=8, alpha=16)
            m.train()
            memory.checkpoint_blocks(m, offload=True)
            params = [p for p in m.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3 if mode != "full" else 1e-4, fused=True)  # as train.py on GPU
            losses = []
            for step in range(30):
                ids = batches[step % len(batches)]
                loss = m.run(train.token_loss_sum, {"input_ids": ids, "labels": ids}) / (ids.numel() - ids.shape[0])
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            curves.append(torch.tensor(losses))
    off, on = curves
    assert on[-5:].mean() < off[0] - 0.1  # it trains
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert ((on - off).abs() / off).max() < tol, (off.tolist(), on.tolist())


def test_training_step_never_waits_for_the_gpu(tmp_path, monkeypatch):
    """Once the trained rows are known (train.token_loss_sum finds them before the forward), forward and
    backward of the SFT loss run no op whose result the CPU must read back (nonzero, boolean-mask indexing,
    .item()): on a GPU such a sync drains the queue of kernels the CPU has launched ahead, and a small
    model's step is CPU-bound. On a GPU the step also runs under torch's sync-debug mode set to "error".
    Checkpointing, offload and the fused loss are on."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from conftest import make_hf_model
    import lora
    import formats
    import train
    aten = torch.ops.aten
    readback = {aten.nonzero.default, aten._local_scalar_dense.default, aten.masked_select.default}
    masked = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

    class Readbacks(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            leaves = torch.utils._pytree.tree_leaves((args[1:], kwargs or {}))
            if func in readback or (func in masked and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                           for t in leaves)):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with kernels.fused(True):
        make_hf_model("llama", tmp_path, num_hidden_layers=3)
        dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
        m = formats.load_model(str(tmp_path), dtype=dtype, device=DEV)
        lora.apply_lora(m, r=8)
        m.train()
        memory.checkpoint_blocks(m, offload=True)
        ids = torch.randint(3, 128, (2, 33), device=DEV)
        labels = ids.clone()
        labels[:, :7] = -100  # a prompt that does not train
        batch = {"input_ids": ids, "labels": labels}
        m.run(train.token_loss_sum, batch).backward()  # warm-up: compile kernels, pin host buffers
        y = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
        rows = kernels.trained_rows(y)
        monkeypatch.setattr(kernels, "trained_rows", lambda *a: rows)
        if DEV == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with Readbacks() as mode:
                m.run(train.token_loss_sum, batch).backward()
        finally:
            if DEV == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert mode.seen == []


@pytest.mark.parametrize("offload,every", [(False, 1), (True, 1), (False, 2)])
def test_offload_releases_block_inputs_until_backward(offload, every, tmp_path):
    """With checkpointing each block keeps its input alive for the recompute; with offload that input lives
    only on the host between forward and backward (the device copy is gone); checkpointing every 2 blocks keeps
    only the first input of each pair (blocks 0-1, 2-3); gradients are unchanged."""
    import weakref
    from conftest import make_hf_model
    import lora
    import formats
    make_hf_model("llama", tmp_path, num_hidden_layers=4)
    m = formats.load_model(str(tmp_path))
    torch.manual_seed(0)
    lora.apply_lora(m, r=4)
    m.train()
    memory.checkpoint_blocks(m, offload=offload, every=every)
    seen = []
    for block in m.model.layers[1:-1]:  # the first block's input is the embedding output, kept by autograd;
        # the last one stays on the device
        block.register_forward_pre_hook(lambda mod, args: seen.append(weakref.ref(args[0])))
    ids = torch.randint(3, 128, (2, 9))
    loss = m.logits(m(ids)).float().logsumexp(-1).sum()
    alive = [r() is not None for r in seen]
    assert alive == ([not offload] * len(seen) if every == 1 else [False, True])
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.skipif(kernels._grouped_mm_fn() is None, reason="torch's grouped_mm arrived in torch 2.9")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adapted", ["", "gate_up", "down", "gate_up,down"])
@pytest.mark.parametrize("oss", [False, True])
def test_moe_grouped_experts(dtype, adapted, oss):
    """The grouped-GEMM expert path (tokens sorted by expert) vs the per-expert loop, against the fp64 loop:
    outputs and the gradients of x, the routing weights, both expert weights and every per-expert LoRA A / B
    (LoRA on neither, one or both projections). One expert is picked by a single token, one by none. oss:
    gpt-oss's experts (biases on both projections, their gradients too; the clamped SwiGLU, its limit low enough
    that a share of the gates and ups is clamped; in bf16 the limit is out of reach: where a pre-activation lies
    within bf16's rounding of the limit the derivative jumps (to 0) on either path, so no bound holds there)."""
    N, C, I, E, k, r = 37, 48, 40, 6, 2, 8
    x, gu, dn = randn(N, C), randn(E, 2 * I, C, seed=1, scale=0.2), randn(E, C, I, seed=2, scale=0.2)
    logits = randn(N, E, seed=3)
    logits[:, 1] = -1e4  # expert 1: no token
    w, idx = torch.topk(logits.softmax(-1), k, dim=-1)
    idx[0] = torch.tensor([E - 1, 0])
    idx[1:, 0][idx[1:, 0] == E - 1] = 2  # expert E-1: only token 0
    idx[1:, 1][idx[1:, 1] == E - 1] = 3
    lora = [randn(E, r, C, seed=4, scale=0.2), randn(E, 2 * I, r, seed=5, scale=0.2),
            randn(E, r, I, seed=6, scale=0.2), randn(E, C, r, seed=7, scale=0.2)]
    on = [p in adapted.split(",") for p in ("gate_up", "gate_up", "down", "down")]
    ab = [t for t, o in zip(lora, on) if o]
    limit = 0.25 if dtype == torch.float32 else 100.0
    act, biases = ("clamped", 1.702, limit) if oss else "silu", [randn(E, 2 * I, seed=8, scale=0.1),
                                                                 randn(E, C, seed=9, scale=0.1)]
    if oss and dtype == torch.float32:  # (the pre-activations spread over about +-1: the clamp is hit often)
        assert ((x @ gu[0].t()).abs() > limit).float().mean() > 0.2

    def call(fn):
        def f(a, b, c, d, *rest):
            rest, bs = (rest[:-2], rest[-2:]) if oss else (rest, None)
            it = iter(rest)
            A1, B1, A2, B2 = (next(it) if o else None for o in on)
            return fn(a, idx, b, c, d, act, (A1, B1, 0.5, A2, B2, 2.0) if rest else None, bs)
        return f
    check(call(kernels.moe_experts_grouped), call(kernels.moe_experts_ref), [x, w, gu, dn] + ab + biases * oss, dtype)


@pytest.mark.skipif(kernels._grouped_mm_fn() is None, reason="torch's grouped_mm arrived in torch 2.9")
def test_moe_stacks_given_as_functions_are_made_where_used():
    """A frozen 4-bit expert stack is passed as a function (kernels.stack): the output and the gradients equal
    those of the tensors, and neither stack is alive when the other is made (forward and backward)."""
    N, C, I, E, k, r = 37, 48, 40, 6, 2, 8
    x, gu, dn = randn(N, C), randn(E, 2 * I, C, seed=1, scale=0.2), randn(E, C, I, seed=2, scale=0.2)
    w, idx = torch.topk(randn(N, E, seed=3).softmax(-1), k, dim=-1)
    lora = [randn(E, r, C, seed=4), randn(E, 2 * I, r, seed=5), randn(E, r, I, seed=6), randn(E, C, r, seed=7)]
    made, alive = [], []

    def maker(W, name):
        def make():
            made.append((name, [n for n, ref in alive if ref() is not None]))
            t = W.clone()
            alive.append((name, weakref.ref(t)))
            return t
        make.shape = W.shape
        return make

    def run(gate_up, down):
        ts = [t.clone().requires_grad_() for t in [x, w] + lora]
        out = kernels.moe_experts_grouped(ts[0], idx, ts[1], gate_up, down, "silu", (*ts[2:4], 0.5, *ts[4:], 2.0))
        (out * torch.linspace(-1, 1, C, device=DEV)).sum().backward()
        return [out] + [t.grad for t in ts]

    for got, want in zip(run(maker(gu, "gate_up"), maker(dn, "down")), run(gu, dn)):
        assert torch.equal(got, want)
    assert made == [("gate_up", []), ("down", []), ("down", []), ("gate_up", [])], made


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", ("clamped", 1.702, 1.5)], ids=["silu", "gelu", "oss"])
def test_moe_row_kernels(dtype, act):
    """The expert path's row kernels (Triton) against their references and fp64: the gated activation of
    [g | u] rows, its backward with the routing weights' gradient, and the k-way weighted and plain combine.
    oss: gpt-oss's clamped SwiGLU, its limit (1.5) inside the rows' spread (about +-4), so both clamps hold often."""
    import kernels as K
    M, I, C, k = 12, 40, 1100, 3  # C > 1024: the combine's second column block
    h, da, wr = randn(M, 2 * I, scale=2.0), randn(M, I, seed=1), randn(M, seed=2).abs()
    y, w = randn(M, C, seed=3), randn(M // k, k, seed=4)
    h2, da2, y2 = randn(M, 2 * I, seed=6), randn(M, I, seed=7), randn(M, C, seed=8)  # (a LoRA term to add)
    inv = torch.randperm(M, generator=torch.Generator().manual_seed(5)).to(DEV)
    cases = [(K.moe_glu_triton, K.moe_glu_ref, lambda t: (t[0], act)),
             (K.moe_glu_triton, K.moe_glu_ref, lambda t: (t[0], act, t[5])),
             (K.moe_glu_back_triton, K.moe_glu_back_ref, lambda t: (t[1], t[0], t[2], act)),
             (K.moe_glu_back_triton, K.moe_glu_back_ref, lambda t: (t[1], t[0], t[2], act, t[6])),
             (K.moe_combine_triton, K.moe_combine_ref, lambda t: (t[3], inv, t[4], k)),
             (K.moe_combine_triton, K.moe_combine_ref, lambda t: (t[3], inv, t[4], k, t[7])),
             (K.moe_combine_triton, K.moe_combine_ref, lambda t: (t[3], inv, None, k))]
    inputs = [h, da, wr, y, w, h2, da2, y2]
    for kernel, ref, args in cases:
        out = [kernel(*args([x.to(dtype) for x in inputs])), ref(*args([x.to(dtype) for x in inputs])),
               ref(*args([x.double() for x in inputs]))]
        flat = [list(o) if isinstance(o, tuple) else [o] for o in out]
        within(flat[2], flat[1], flat[0], dtype)
    kept = [h.to(dtype), h.to(dtype), h.double()]  # keep_h: h += h2 in place, as the backward will read it
    for fn, t in zip([K.moe_glu_triton, K.moe_glu_ref, K.moe_glu_ref], kept):
        fn(t, act, h2.to(t.dtype), keep_h=True)
    within([kept[2]], [kept[1]], [kept[0]], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_bias_sums(dtype):
    """The expert biases' gradients over rows sorted by expert (Triton vs index_add and fp64): per-expert sums,
    weighted and plain, with an expert that got no rows and one with more rows than a block; and each row's dot
    with its expert's bias."""
    import kernels as K
    counts = torch.tensor([3, 0, 40, 1, 7])
    ex, offs = torch.repeat_interleave(torch.arange(5), counts).to(DEV), counts.cumsum(0).to(torch.int32).to(DEV)
    M, N = int(counts.sum()), 150  # N > 128: a second column block
    x, wr, b = randn(M, N, seed=1), randn(M, seed=2).abs(), randn(5, N, seed=3)
    for kernel, ref, args in [(K.expert_sums_triton, K.expert_sums_ref, lambda t: (t[0], offs, ex, t[1])),
                              (K.expert_sums_triton, K.expert_sums_ref, lambda t: (t[0], offs, ex)),
                              (K.row_dot_triton, K.row_dot_ref, lambda t: (t[0], t[2], ex))]:
        out = [fn(*args(ts)) for fn, ts in [(kernel, [t.to(dtype) for t in (x, wr, b)]),
                                              (ref, [t.to(dtype) for t in (x, wr, b)]),
                                              (ref, [t.double() for t in (x, wr, b)])]]
        within([out[2]], [out[1]], [out[0]], torch.float32)  # both accumulate in fp32
    assert K.expert_sums_triton(x, offs, ex)[1].abs().max() == 0


def test_moe_recompute_skips_the_output_and_keeps_every_gradient():
    """Inside a recompute whose output is unused (kernels.skip_value), the expert path skips the down
    projection and the combine; the gradients equal the full forward's."""
    N, C, I, E, k, r = 29, 32, 24, 5, 2, 4
    x, gu, dn = randn(N, C), randn(E, 2 * I, C, seed=1, scale=0.2), randn(E, C, I, seed=2, scale=0.2)
    w, idx = torch.topk(randn(N, E, seed=3).softmax(-1), k, dim=-1)
    lora = [randn(E, r, C, seed=4, scale=0.2), randn(E, 2 * I, r, seed=5, scale=0.2),
            randn(E, r, I, seed=6, scale=0.2), randn(E, C, r, seed=7, scale=0.2)]
    dout = randn(N, C, seed=8)
    grads = []
    for skip in (False, True):
        ts = [t.detach().clone().requires_grad_() for t in [x, w] + lora]
        with kernels.hint("recompute", skip), kernels.value_unused(skip):
            out = kernels.moe_experts_grouped(ts[0], idx, ts[1], gu, dn, "silu", (ts[2], ts[3], 0.5, ts[4], ts[5], 2.0))
        out.backward(dout)
        grads.append([t.grad for t in ts])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True, "packed"])
def test_sink_attention(dtype, masked):
    """gpt-oss's attention with sinks through the plain attention kernel and its log-sum-exp (O sigmoid(L - s)),
    against the written-out softmax over [scores, sink] and fp64: the output and the gradients of q, k, v (GQA: 6
    heads over 2) and the sinks; causal (no mask), or a sliding window of 5 with a left-padded row. packed:
    rows of documents (PackedRows) within a window of 5: flash attention over the flattened tokens on a GPU (16-bit;
    fp32 and CPU: the bool mask they stand for), against the reference given that mask."""
    B, H, KV, T, D = 2, 6, 2, 13, 24
    q, k, v = randn(B, H, T, D, seed=1), randn(B, KV, T, D, seed=2), randn(B, KV, T, D, seed=3)
    sinks = randn(H, seed=4)
    mask = None
    if masked == "packed":
        rows = kernels.PackedRows(torch.tensor([0, 5, 13, 20, 26], dtype=torch.int32, device=DEV), 8, 5)
        dense = kernels.rows_mask(rows, B, T)
        assert dense[0, 0, 6].tolist() == [False] * 5 + [True, True] + [False] * 6  # doc 2 from token 5
        assert dense[1, 0, 12].tolist() == [False] * 8 + [True] * 5  # doc 4 from token 7, window 5

        given = rows if dtype == torch.bfloat16 else dense
        check(lambda *t: kernels.sink_attention(*t, given, D ** -0.5),
              lambda *t: kernels.sink_attention_ref(*t, dense, D ** -0.5), [q, k, v, sinks], dtype)
        return
    if masked:
        i = torch.arange(T, device=DEV)
        mask = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 5))[None, None].repeat(B, 1, 1, 1)
        mask[1, :, :, :3] = False  # row 1: three padded keys
        mask |= torch.eye(T, dtype=torch.bool, device=DEV)  # (every query sees itself, as model.py's masks)

    def call(fn):
        return lambda q, k, v, s: fn(q, k, v, s, mask, D ** -0.5)
    check(call(kernels.sink_attention), call(kernels.sink_attention_ref), [q, k, v, sinks], dtype)


def test_the_installed_kernels_package_is_reached_through_nanotunes_file():
    """transformers >= 5.25 imports the Hugging Face `kernels` package, whose module name is kernels.py's: names the
    file lacks come from the installed package (transformers, PEFT and bitsandbytes load models in a process that
    runs nanotune, e.g. export --verify), and the two share no public name."""
    import os
    package = kernels._installed_package()
    if not package:
        pytest.skip("the Hugging Face kernels package is not installed (transformers < 5.25)")
    assert os.path.dirname(package.__file__) != os.path.dirname(kernels.__file__)
    names = {n for n in dir(package) if not n.startswith("_") and not isinstance(getattr(package, n), type(os))}
    assert not names & set(dir(kernels))  # (modules both import, e.g. importlib, aside)
    assert kernels.LayerRepository is package.LayerRepository and kernels.__version__ == package.__version__
    with pytest.raises(AttributeError):
        kernels.no_such_name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("N,K", [(5, 37), (3, 2600)])
def test_fp8_rows_kernel_equals_torchs_rounding_bit_for_bit(dtype, cols, N, K):
    """The FP8 operands' one-pass kernel (each row's scale, then x c / s rounded to e4m3 on the bits) gives
    PyTorch's bytes and scales exactly: values across e4m3's range (448 and its subnormals below 2^-6 included,
    ties to even), a zero row, a strided view, rows longer than one block (2,048), per-column scales or none."""
    x = randn(N, K + 3, seed=2) * torch.logspace(-5, 0, K + 3, device=DEV)  # (magnitudes over 5 decades)
    x[0, 2:8] = torch.tensor([448.0, 1.0625, -1.1875, 3 * 2**-10, 2**-10, -0.0], device=DEV)  # (row scale 1: ties
    #                                            to even, 1.0625 -> 1, 1.1875 -> 1.25, 3 * 2^-10 -> 2^-8, 2^-10 -> 0)
    x[1] = 0.0
    x = x.to(dtype)[:, 2 : K + 2]  # (a view whose rows are strided)
    c = (torch.rand(K, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEV) if cols else None
    q, s = kernels.fp8_rows_triton(x, c)
    q_ref, s_ref = kernels.fp8_rows_ref(x, c)
    assert torch.equal(s, s_ref), f"scales of rows {(s != s_ref).nonzero().flatten().tolist()} differ"
    bad = (q.view(torch.uint8) != q_ref.view(torch.uint8)).nonzero()
    assert not len(bad), f"{len(bad)} bytes differ, first (row, col, x / s, kernel, torch): " + str(
        [(i, j, (x[i, j].float() * (c[j] if cols else 1) / s[i]).item(), hex(q.view(torch.uint8)[i, j].item()),
          hex(q_ref.view(torch.uint8)[i, j].item())) for i, j in bad[:4].tolist()])
    codes = q.view(torch.uint8) & 0x7F
    assert (codes == 0x7E).any() and ((codes > 0) & (codes < 8)).any()  # (448 and subnormals were both made)
    assert s[1] == 1e-12 / 448 and not q[1].float().any()


@pytest.mark.parametrize("R,C", [(70, 45), (128, 64), (1, 130)])
def test_transposed_fp8_bytes_equal_torchs(R, C):
    """The tiled transpose of an e4m3 weight (dx = dy W's column-major operand) gives torch's transposed copy byte for
    byte: shapes within one 64 x 64 tile, whole tiles, and tiles cut at either edge."""
    q = kernels.fp8_weight(randn(R, C, seed=4)).q
    got, ref = kernels.transpose_bytes_triton(q), kernels.transpose_bytes_ref(q)
    assert got.shape == (C, R) and got.dtype == q.dtype and torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose,fast", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("N,C,O", [(37, 70, 45), (64, 96, 48)])
def test_fp8_matmul_against_its_reference_and_the_fp64_truth(dtype, transpose, fast, N, C, O, monkeypatch):
    """The FP8 base GEMMs (torch._scaled_mm, per-row e4m3 scales) on odd shapes (a GPU's FP8 GEMM takes multiples
    of 16: there they go through the reference) and even ones: y = x W^T (also with a GPU's fast accumulation) and
    dx = dy W equal the same e4m3 rounding multiplied in fp32 (1e-5 / bf16's rounding; a GPU's bf16 result: 1e-2),
    and stay within e4m3's bound of the fp64 truth: both operands rounded to 3 mantissa bits (relative 2^-4 each):
    <= 0.13 sum |x||w|."""
    monkeypatch.setattr(kernels, "FP8_FAST_ACCUM", fast)
    w = kernels.fp8_weight(randn(O, C, seed=1) * 0.05)
    x = randn(N, C if transpose else O).to(dtype)
    got, ref = kernels.fp8_matmul(x, w, transpose), kernels.fp8_matmul_ref(x, w, transpose)
    assert got.dtype == dtype and got.shape == (N, O if transpose else C)
    tol = TOL[torch.bfloat16] if DEV == "cuda" else TOL[dtype]
    err, cols = (got.double() - ref.double()).abs(), None if transpose else w.scale
    assert err.max() <= tol * ref.double().abs().max(), (  # (what a GPU run needs to see if it fails)
        f"max error {err.max().item():.4f} at {divmod(err.argmax().item(), err.shape[1])}, of |ref| <= "
        f"{ref.abs().max().item():.4f}; the operand's kernel and reference bytes differ in "
        f"{(kernels.fp8_rows(x, cols)[0].view(torch.int8) != kernels.fp8_rows_ref(x, cols)[0].view(torch.int8)).sum()}"
        " places")
    W = randn(O, C, seed=1).double() * 0.05  # (the weight before its own rounding)
    truth, size = (x.double() @ W.t(), x.double().abs() @ W.abs().t()) if transpose else \
        (x.double() @ W, x.double().abs() @ W.abs())
    assert ((got.double() - truth).abs() <= 0.13 * size + tol * truth.abs().max()).all()
    assert (got.double() - truth).abs().max() > 1e-4 * truth.abs().max()  # (it is FP8: not the exact product)


def test_fp8_matmul_on_a_cpu_whose_scaled_mm_takes_no_row_scales(monkeypatch):
    """torch 2.11's CPU _scaled_mm takes one scale per operand (it raises for row scales): fp8_matmul asks once and
    takes the reference there, the same e4m3 rounding multiplied in fp32. (CPU tensors on the GPU machine too.)"""
    w, x = kernels.fp8_weight(randn(48, 64, seed=1).cpu()), randn(32, 64).cpu()

    def per_tensor_only(a, b, scale_a, scale_b, **kw):
        if scale_a.numel() != 1 or scale_b.numel() != 1:
            raise RuntimeError("Now _scaled_mm only supports per-tensor scaling for CPU backend.")
    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    kernels.cpu_row_scaled_mm.cache_clear()
    try:
        assert not kernels.cpu_row_scaled_mm()
        assert torch.equal(kernels.fp8_matmul(x, w), kernels.fp8_matmul_ref(x, w))
    finally:
        kernels.cpu_row_scaled_mm.cache_clear()

