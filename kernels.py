"""nanotune kernels: the fused ops of a decoder, each beside its plain-PyTorch reference (where activations
live, checkpointing, offload, the LoRA cast cache and CUDA graphs, is memory.py's).

Each op has a reference (the ground truth, tested against fp64) and a fused path: a Triton kernel for CUDA
tensors, and for LoRA, the loss and linear layers, autograd Functions with a manual backward in plain PyTorch
that run on any device. One switch picks them; it knows nothing of nanotune's other files.

    with kernels.fused(False):   # the references everywhere (tests, debugging)
        loss = ...
    with kernels.hint("recompute"), kernels.value_unused():   # inside: ops may skip an output nobody reads
"""
import contextlib
import functools
import importlib
import math
import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

try:  # Triton runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (the CI tests)
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# transformers >= 5.25 (and bitsandbytes) import the Hugging Face `kernels` package, whose module name is this file's:
# with nanotune first on the path, `from kernels import LayerRepository` finds this file. Any name it lacks is then
# the installed package's, loaded on first use from outside this directory (a module __getattr__, PEP 562; the two
# share no public name), so transformers and PEFT work in a process that runs nanotune (export --verify, notebooks).
_PACKAGE = None


def __getattr__(name):
    global _PACKAGE
    if not name.startswith("__") or name == "__version__":  # (bitsandbytes checks the package's version)
        if _PACKAGE is None:
            _PACKAGE = _installed_package()
        if _PACKAGE:
            return getattr(_PACKAGE, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _installed_package():
    """The `kernels` package installed beside transformers, or False."""
    here, me, path = os.path.dirname(os.path.abspath(__file__)), sys.modules[__name__], sys.path[:]
    sys.path[:] = [p for p in path if os.path.abspath(p or ".") != here]
    del sys.modules[__name__]
    try:
        package = importlib.import_module("kernels")
        return package if hasattr(package, "__path__") else False
    except Exception:  # (not installed, or broken: then the names are simply missing)
        return False
    finally:
        sys.path[:] = path
        sys.modules[__name__] = me  # (the package's submodules stay under their own names)


_FUSED = True  # on: Triton kernels for CUDA tensors, the fused autograd Functions (plain PyTorch) anywhere
_CAST_CACHE = None  # fn(As, Bs, scalings, dtype) -> lora_casts' result, cached (memory.py installs one)


@contextlib.contextmanager
def fused(on: bool = True):
    """Within the block, the fused paths (on) or the plain-PyTorch references (off); restored after."""
    global _FUSED
    old, _FUSED = _FUSED, bool(on)
    try:
        yield
    finally:
        _FUSED = old


def set_fused(on: bool):
    """The same switch for the rest of the process (bench.py's `-ref` contenders)."""
    global _FUSED
    _FUSED = bool(on)


def set_cast_cache(fn):
    """Where the fused LoRA path gets its cast weights: fn as lora_casts (memory.py's cache), or None (cast at
    every call: under FSDP, whose all-gathers rewrite the same tensors)."""
    global _CAST_CACHE
    _CAST_CACHE = fn


def _triton(t: torch.Tensor) -> bool:
    """Whether t goes through a Triton kernel: fused paths on, Triton installed, t on CUDA."""
    return _FUSED and triton is not None and t.is_cuda


_STAGES = {}  # (kernel, its block sizes, GPU) -> the software-pipelining depth that fits that GPU's shared memory


def launch_fitting(kernel, grid, args, consts, num_warps, depths):
    """kernel[grid](*args, **consts) software-pipelined depths[0] deep, else the next of `depths` whose shared memory
    fits this GPU (per block an H100 has 227 KiB, an A100 163, consumer cards ~100; Triton refuses the launch before
    it starts), kept for the next call."""
    key = (kernel, tuple(consts.items()), num_warps, next(a for a in args if torch.is_tensor(a)).device)
    for stages in [_STAGES[key]] if key in _STAGES else depths:
        try:
            kernel[grid](*args, **consts, num_warps=num_warps, num_stages=stages)
        except triton.runtime.errors.OutOfResources:
            if stages == depths[-1]:
                raise
            continue
        _STAGES[key] = stages
        return


# ---------------------------------------------------------------------------------------------
# RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w)     offset = 0 (Llama), 1 (Gemma)
# Statistics in fp32, as every reference implementation does; the result in x's dtype.
def rms_norm_ref(x, weight, eps: float, offset: float = 0.0):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma: scale in fp32, then cast
        return (y * (offset + weight.float())).to(x.dtype)
    return weight * y.to(x.dtype)  # Llama: cast, then scale in the weight's dtype


# Gated (Qwen3.5's Gated DeltaNet output, transformers' Qwen3_5RMSNormGated): y = (w * rmsnorm(x)) * silu(z), the
# norm as Llama's (cast, then w in the weight's dtype), the gate in fp32, the result in x's dtype. The kernel (the
# RMSNorm's, GATE) rounds once, at the end; the PyTorch form makes ~10 passes over [tokens, heads, 128] fp32 / bf16
# tensors each way (2.4 GB a Qwen3.5-4B layer forward at 4 x 2048 tokens, counted on meta tensors).
def gated_rms_norm_ref(x, z, weight, eps: float):
    return (rms_norm_ref(x, weight, eps) * torch.nn.functional.silu(z.float())).to(x.dtype)


if triton is not None:
    @triton.jit
    def _rms_fwd(X, W, Z, Y, RSTD, C, eps, offset, BLOCK: tl.constexpr, GEMMA: tl.constexpr, GATE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(X + row * C + cols, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
        w = tl.load(W + cols, mask=m, other=0.0)
        if GEMMA:  # (x * rstd) * (offset + w) in fp32, one rounding
            y = x * rstd * (offset + w.to(tl.float32))
        elif GATE:  # (x * rstd) * w * silu(z) in fp32, one rounding (the reference rounds twice before the gate)
            z = tl.load(Z + row * C + cols, mask=m, other=0.0).to(tl.float32)
            y = x * rstd * w.to(tl.float32) * z * tl.sigmoid(z)
        else:  # Llama: round x * rstd to the activation dtype, then scale by w (as the reference does)
            y = (x * rstd).to(Y.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
        tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=m)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_bwd(DY, X, W, Z, RSTD, DX, DW, DZ, C, offset, rows_per_prog, n_rows, BLOCK: tl.constexpr,
                 NEED_DW: tl.constexpr, GATE: tl.constexpr):
        # dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * (offset + w),  xhat = x * rstd
        # dw = sum_rows dy * xhat   (per-program partial sums, added up in PyTorch)
        # GATE (y = w xhat silu(z)): dy becomes dy silu(z) above, and dz = dy (w xhat) silu'(z),
        #   silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32) + offset
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        row0 = pid.to(tl.int64) * rows_per_prog
        for k in range(0, rows_per_prog):
            r = row0 + k
            rm = m & ((r + cols * 0) < n_rows)  # broadcast the row test over the block
            x = tl.load(X + r * C + cols, mask=rm, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * C + cols, mask=rm, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + tl.minimum(r, n_rows - 1))  # rows past the end are masked above
            xhat = x * rstd
            if GATE:
                z = tl.load(Z + r * C + cols, mask=rm, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                tl.store(DZ + r * C + cols, (dy * w * xhat * sig * (1.0 + z * (1.0 - sig))).to(DZ.dtype.element_ty),
                         mask=rm)
                dy = dy * z * sig
            g = dy * w
            dx = rstd * (g - xhat * tl.sum(g * xhat, 0) / C)
            tl.store(DX + r * C + cols, dx.to(DX.dtype.element_ty), mask=rm)
            if NEED_DW:
                dw += dy * xhat
        if NEED_DW:
            tl.store(DW + pid * C + cols, dw, mask=m)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, offset, z=None, dtype=None):
        shape, x2 = x.shape, x.reshape(-1, x.shape[-1]).contiguous()
        z2 = z.reshape(x2.shape).contiguous() if z is not None else None
        N, C = x2.shape
        y = torch.empty_like(x2, dtype=dtype or x.dtype)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        BLOCK = triton.next_power_of_2(C)
        _rms_fwd[(N,)](x2, w, z2 if z is not None else x2, y, rstd, C, eps, offset, BLOCK=BLOCK, GEMMA=bool(offset),
                       GATE=z is not None, num_warps=min(16, max(1, BLOCK // 256)))
        ctx.save_for_backward(x2, w, rstd, z2)
        ctx.offset, ctx.shape = offset, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd, z2 = ctx.saved_tensors
        N, C = x2.shape
        dy = dy.reshape(N, C).contiguous()
        dx = torch.empty_like(x2)
        dz = torch.empty_like(z2) if z2 is not None else None
        need_dw = ctx.needs_input_grad[1]  # frozen norm weights (LoRA): no weight-gradient work at all
        progs, rows_per = _norm_programs(N, x2.device)
        dw = torch.empty((progs, C), dtype=torch.float32, device=x2.device) if need_dw else rstd
        BLOCK = triton.next_power_of_2(C)
        gate = (z2, dz) if z2 is not None else (x2, dx)  # (unused pointers without a gate)
        _rms_bwd[(progs,)](dy, x2, w, gate[0], rstd, dx, dw, gate[1], C, ctx.offset, rows_per, N, BLOCK=BLOCK,
                           NEED_DW=need_dw, GATE=z2 is not None, num_warps=min(16, max(1, BLOCK // 256)))
        dz = dz.view(ctx.shape) if dz is not None else None
        return dx.view(ctx.shape), (dw.sum(0).to(w.dtype) if need_dw else None), None, None, dz, None


def _norm_programs(N, device):
    """(programs, rows per program) for a norm backward that sums weight gradients per program."""
    progs = min(N, 4 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2))
    return progs, triton.cdiv(N, progs)


def rms_norm_triton(x, weight, eps: float, offset: float = 0.0):
    return _RMSNorm.apply(x, weight, eps, float(offset))


def rms_norm(x, weight, eps: float, offset: float = 0.0):
    if _triton(x):
        return rms_norm_triton(x, weight, eps, offset)
    return rms_norm_ref(x, weight, eps, offset)


def gated_rms_norm_triton(x, z, weight, eps: float):
    return _RMSNorm.apply(x, weight, eps, 0.0, z)


def gated_rms_norm(x, z, weight, eps: float):
    return (gated_rms_norm_triton if _triton(x) else gated_rms_norm_ref)(x, z, weight, eps)


# L2 norm over the last dimension, times a scale: x / sqrt(sum(x^2) + eps) * s, in fp32 from any input (Gated
# DeltaNet's q and k, as FLA's and transformers' l2norm). It is an RMS norm: rsqrt(sum + eps) = rsqrt(mean + eps / d)
# / sqrt(d), so the kernel is the RMSNorm one with eps / d and a constant weight s / sqrt(d), written in fp32.
def l2_norm_ref(x, scale: float = 1.0, eps: float = 1e-6):
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps) * scale


def l2_norm_triton(x, scale: float = 1.0, eps: float = 1e-6):
    d = x.shape[-1]
    w = torch.full((d,), scale / math.sqrt(d), device=x.device, dtype=torch.float32)
    return _RMSNorm.apply(x, w, eps / d, 0.0, None, torch.float32)


def l2_norm(x, scale: float = 1.0, eps: float = 1e-6):
    return (l2_norm_triton if _triton(x) else l2_norm_ref)(x, scale, eps)


# ---------------------------------------------------------------------------------------------
# LayerNorm (Phi-2): y = (x - mean(x)) / sqrt(var(x) + eps) * w + b, statistics in fp32
def layer_norm_ref(x, weight, bias, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


if triton is not None:
    @triton.jit
    def _ln_fwd(X, W, B, Y, MEAN, RSTD, C, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(X + row * C + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, 0) / C
        xc = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / C + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * C + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=m)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _ln_bwd(DY, X, W, MEAN, RSTD, DX, DW, DB, C, rows_per_prog, n_rows, BLOCK: tl.constexpr,
                NEED_DW: tl.constexpr):
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w,  xhat = (x - mean) * rstd
        # dw = sum_rows dy * xhat, db = sum_rows dy   (per-program partial sums, added up in PyTorch)
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        db = tl.zeros((BLOCK,), dtype=tl.float32)
        row0 = pid.to(tl.int64) * rows_per_prog
        for k in range(0, rows_per_prog):
            r = row0 + k
            rm = m & ((r + cols * 0) < n_rows)
            x = tl.load(X + r * C + cols, mask=rm, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * C + cols, mask=rm, other=0.0).to(tl.float32)
            rr = tl.minimum(r, n_rows - 1)
            xhat = tl.where(rm, (x - tl.load(MEAN + rr)) * tl.load(RSTD + rr), 0.0)
            g = dy * w
            dx = tl.load(RSTD + rr) * (g - tl.sum(g, 0) / C - xhat * tl.sum(g * xhat, 0) / C)
            tl.store(DX + r * C + cols, dx.to(DX.dtype.element_ty), mask=rm)
            if NEED_DW:
                dw += dy * xhat
                db += dy
        if NEED_DW:
            tl.store(DW + pid * C + cols, dw, mask=m)
            tl.store(DB + pid * C + cols, db, mask=m)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, eps):
        shape, x2 = x.shape, x.reshape(-1, x.shape[-1]).contiguous()
        N, C = x2.shape
        y = torch.empty_like(x2)
        mean, rstd = (torch.empty(N, dtype=torch.float32, device=x.device) for _ in range(2))
        BLOCK = triton.next_power_of_2(C)
        _ln_fwd[(N,)](x2, w, b, y, mean, rstd, C, eps, BLOCK=BLOCK, num_warps=min(16, max(1, BLOCK // 256)))
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.shape, ctx.b_dtype = shape, b.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        N, C = x2.shape
        dy = dy.reshape(N, C).contiguous()
        dx = torch.empty_like(x2)
        need_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        progs, rows_per = _norm_programs(N, x2.device)
        dw, db = ((torch.empty((progs, C), dtype=torch.float32, device=x2.device) if need_dw else rstd)
                  for _ in range(2))
        BLOCK = triton.next_power_of_2(C)
        _ln_bwd[(progs,)](dy, x2, w, mean, rstd, dx, dw, db, C, rows_per, N, BLOCK=BLOCK, NEED_DW=need_dw,
                          num_warps=min(16, max(1, BLOCK // 256)))
        if not need_dw:
            return dx.view(ctx.shape), None, None, None
        return dx.view(ctx.shape), dw.sum(0).to(w.dtype), db.sum(0).to(ctx.b_dtype), None


def layer_norm_triton(x, weight, bias, eps: float):
    return _LayerNorm.apply(x, weight, torch.zeros_like(weight) if bias is None else bias, eps)  # (None: Cohere)


def layer_norm(x, weight, bias, eps: float):
    if _triton(x):
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# RoPE, "rotate half" convention (Hugging Face): for the first `rot` dims of each head,
#   x1, x2 = x[:rot/2], x[rot/2:rot]
#   out = [x1*cos - x2*sin, x2*cos + x1*sin]        cos/sin: [B, T, rot] (halves repeated)
# Dims past `rot` (partial rotary, Phi-3.5/4) pass through unchanged.
def rope_ref(x, cos, sin):
    """x: [B, H, T, D]; cos, sin: [B, T, rot]."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # [B, 1, T, rot]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * cos + rotated * sin, xp), dim=-1)


if triton is not None:
    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, H, T, D, sxb, sxh, sxt, syb, syh, syt, HALF, BLOCK_H: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, SIGN: tl.constexpr):
        # one program per (b, t): every head's first 2*HALF dims rotated, the other D - 2*HALF copied
        # (BLOCK_R >= HALF and BLOCK_P >= D - 2*HALF are powers of two; BLOCK_P = 0: full rotary)
        bt = tl.program_id(0).to(tl.int64)
        b, t = bt // T, bt % T
        h = tl.arange(0, BLOCK_H)[:, None]
        i = tl.arange(0, BLOCK_R)[None, :]
        mh, mi = h < H, i < HALF
        m = mh & mi
        cos = tl.load(COS + bt * 2 * HALF + i, mask=mi, other=0.0).to(tl.float32)
        sin = tl.load(SIN + bt * 2 * HALF + i, mask=mi, other=0.0).to(tl.float32) * SIGN  # -1: inverse rotation
        xp = X + b * sxb + t * sxt + h * sxh
        yp = Y + b * syb + t * syt + h * syh
        x1 = tl.load(xp + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF + i, mask=m, other=0.0).to(tl.float32)
        tl.store(yp + i, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=m)
        tl.store(yp + HALF + i, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=m)
        if BLOCK_P > 0:  # partial rotary (Phi-2, Phi-4): the rest of each head passes through
            j = 2 * HALF + tl.arange(0, BLOCK_P)[None, :]
            mj = mh & (j < D)
            tl.store(yp + j, tl.load(xp + j, mask=mj, other=0.0), mask=mj)


def _rope_launch(x, cos, sin, sign):
    B, H, T, D = x.shape
    rot = cos.shape[-1]
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)  # [B, H, T, D] view
    rest = triton.next_power_of_2(D - rot) if D > rot else 0
    _rope_kernel[(B * T,)](x, cos, sin, y, H, T, D, x.stride(0), x.stride(1), x.stride(2), y.stride(0),
                           y.stride(1), y.stride(2), rot // 2, BLOCK_H=triton.next_power_of_2(H),
                           BLOCK_R=triton.next_power_of_2(rot // 2), BLOCK_P=rest, SIGN=sign)
    return y


class _RoPE(torch.autograd.Function):
    """Forward rotates by theta; backward rotates the gradient by -theta (the transpose of a rotation)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, -1.0), None, None


def rope_triton(x, cos, sin):
    return _RoPE.apply(x, cos.float(), sin.float())


def rope(x, cos, sin):
    if _triton(x) and x.stride(-1) == 1:
        return rope_triton(x, cos, sin)
    return rope_ref(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# Gated MLP activation: act(gate) * up, with act = silu (SwiGLU) or tanh-approximate GELU (GeGLU); gpt-oss's
# experts: act = ("clamped", alpha, limit), g' = min(g, limit), (clamp(up, -limit, limit) + 1) * g' sigmoid(alpha g')
def gated_act_ref(gate, up, act):
    if isinstance(act, tuple):
        _, alpha, limit = act
        g = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)
    if act == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


if triton is not None:
    @triton.jit
    def _gelu_tanh_parts(g):
        # gelu(g) = 0.5 g (1 + tanh(k (g + 0.044715 g^3))), k = sqrt(2/pi); returns (gelu, d gelu / d g)
        k: tl.constexpr = 0.7978845608028654
        inner = k * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g)

    @triton.jit
    def _act_parts(g, GELU: tl.constexpr):  # (act(g), act'(g)) in fp32: tanh-GELU or SiLU
        if GELU:
            return _gelu_tanh_parts(g)
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))

    @triton.jit
    def _glu_fwd(G, U, Y, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        g = tl.load(G + i, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + i, mask=m, other=0.0).to(tl.float32)
        a, _ = _act_parts(g, GELU)
        tl.store(Y + i, (a * u).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _glu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
        # recomputed, nothing saved but the inputs: dU = dy act(g), dG = dy u act'(g)
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        dy = tl.load(DY + i, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + i, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + i, mask=m, other=0.0).to(tl.float32)
        a, da = _act_parts(g, GELU)
        tl.store(DU + i, (dy * a).to(DU.dtype.element_ty), mask=m)
        tl.store(DG + i, (dy * u * da).to(DG.dtype.element_ty), mask=m)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gelu):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = y.numel()
        _glu_fwd[(triton.cdiv(n, 1024),)](gate, up, y, n, BLOCK=1024, GELU=gelu)
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _glu_bwd[(triton.cdiv(n, 1024),)](dy.contiguous(), gate, up, dg, du, n, BLOCK=1024, GELU=ctx.gelu)
        return dg, du, None


def gated_act_triton(gate, up, act: str):
    return _GLU.apply(gate, up, act != "silu")


def gated_act(gate, up, act: str):
    if _triton(gate):
        return gated_act_triton(gate, up, act)
    return gated_act_ref(gate, up, act)


# ---------------------------------------------------------------------------------------------
# Attention with sinks (gpt-oss): a learned logit s_h per head joins every row's softmax and takes its share,
#   y = softmax([q k^T * scale, s_h])[:-1] v = O * sigmoid(L - s_h)
# with O the plain attention output and L its log-sum-exp over the keys. So the fused path runs the plain
# attention kernel (PyTorch's memory-efficient one on CUDA, its flash one on CPU), which returns L, and scales O.
# Backward, g = sigmoid(L - s): dO = g dy, dL = (1 - g) <dy, y>, ds_h = -sum dL; and dL's share of the scores'
# gradient, dL P, is what the kernel's backward adds when it is handed y = g O as "the output" (it forms
# D = <dO, out> per row, and D(y) = D(O) - dL). q [B, H, T, D], k/v [B, KV, S, D], mask [B, 1, T, S] bool or None
# (causal).
def sink_attention_ref(q, k, v, sinks, mask, scale):
    B, H, T, _ = q.shape
    k, v = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, T, S]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    elif T > 1:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(B, -1, T, 1).to(s.dtype)], dim=-1)
    return F.softmax(s.float(), dim=-1).to(q.dtype)[..., :-1] @ v


def _attention_bias(mask, H, dtype):
    """bool [B, 1, T, S] -> an additive float bias [B, H, T, S] (0 or -inf) whose rows are 16-aligned in memory,
    as the memory-efficient kernel wants (a padded buffer, sliced)."""
    B, _, T, S = mask.shape
    bias = torch.zeros(B, 1, T, -(-S // 16) * 16, dtype=dtype, device=mask.device)[..., :S]
    return bias.masked_fill_(~mask, float("-inf")).expand(B, H, T, S)


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, scale):
        (_, H, T, _), rep = q.shape, q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))  # (the kernels take no GQA)
        causal, bias = mask is None and T > 1, None if mask is None else _attention_bias(mask, H, q.dtype)
        if q.is_cuda:
            o, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, 0.0, causal, scale=scale)
        else:
            (o, lse), seed, offset = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, attn_mask=bias, scale=scale), None, None
        g = torch.sigmoid(lse[..., :T].float() - sinks.float().view(1, -1, 1))  # [B, H, T]
        y = (o.float() * g[..., None]).to(q.dtype)
        ctx.save_for_backward(q, k, v, sinks, bias, y, lse, g, seed, offset)
        ctx.scale, ctx.causal, ctx.rep = scale, causal, rep
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, sinks, bias, y, lse, g, seed, offset = ctx.saved_tensors
        do = (dy.float() * g[..., None]).to(q.dtype)
        if q.is_cuda:
            dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                do, q, k, v, bias, y, lse, seed, offset, 0.0, [True, True, True, False], ctx.causal, scale=ctx.scale)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, y, lse, 0.0, ctx.causal, attn_mask=bias, scale=ctx.scale)
        B, H, S, D = dk.shape
        dk, dv = (t.view(B, H // ctx.rep, ctx.rep, S, D).sum(2) for t in (dk, dv))
        dl = (1 - g) * (dy.float() * y.float()).sum(-1)  # [B, H, T]
        return dq, dk, dv, (-dl.sum((0, 2))).to(sinks.dtype), None, None


class _SinkVarlen(torch.autograd.Function):
    """The same on CUDA for whole or packed rows (PackedRows): flash attention over the flattened documents,
    which returns L too and skips the key blocks a sliding window leaves out (no mask, no [T, T] work outside the
    window); K/V heads stay grouped (flash takes GQA). Tokens flattened: [B*T, heads, D], L [H, B*T]."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, rows, scale):
        B, H, T, D = q.shape
        q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v))
        left = -1 if rows.window is None else rows.window - 1  # flash keeps keys j with i - left <= j <= i
        o, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, rows.cu, rows.cu, rows.max_len, rows.max_len, 0.0, left < 0, False, scale=scale,
            window_size_left=left, window_size_right=0)
        g = torch.sigmoid(lse.t().float() - sinks.float())  # [B*T, H]
        y = (o.float() * g[..., None]).to(q.dtype)
        ctx.save_for_backward(q, k, v, sinks, y, lse, g, seed, offset)
        ctx.rows, ctx.scale, ctx.left, ctx.shape = rows, scale, left, (B, H, T, D)
        return y.view(B, T, H, D).transpose(1, 2)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, sinks, y, lse, g, seed, offset = ctx.saved_tensors
        (B, H, T, D), rows = ctx.shape, ctx.rows
        dy = dy.transpose(1, 2).reshape(B * T, H, D).float()
        do = (dy * g[..., None]).to(q.dtype)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do, q, k, v, y, lse, rows.cu, rows.cu, rows.max_len, rows.max_len, 0.0, ctx.left < 0, seed, offset,
            scale=ctx.scale, window_size_left=ctx.left, window_size_right=0)
        dl = (1 - g) * (dy * y.float()).sum(-1)  # [B*T, H]
        dq, dk, dv = (t.view(B, T, t.shape[1], D).transpose(1, 2) for t in (dq, dk, dv))
        return dq, dk, dv, (-dl.sum(0)).to(sinks.dtype), None, None


def rows_mask(rows, B, T):
    """PackedRows of B rows of T tokens -> the bool [B, 1, T, T] mask they stand for (causal, same document,
    within the window): the reference for the varlen paths."""
    doc = torch.searchsorted(rows.cu[1:].long(), torch.arange(B * T, device=rows.cu.device), right=True).view(B, T)
    i = torch.arange(T, device=rows.cu.device)
    m = (doc[:, :, None] == doc[:, None, :]) & (i[:, None] >= i[None, :])
    if rows.window is not None:
        m &= i[:, None] - i[None, :] < rows.window
    return m[:, None]


def sink_attention(q, k, v, sinks, mask, scale):
    """mask: bool [B, 1, T, S], None (causal) or PackedRows (flash, CUDA)."""
    if isinstance(mask, PackedRows) and not (_FUSED and q.is_cuda):
        mask = rows_mask(mask, q.shape[0], q.shape[2])
    if _FUSED:
        return (_SinkVarlen if isinstance(mask, PackedRows) else _SinkAttention).apply(q, k, v, sinks, mask, scale)
    return sink_attention_ref(q, k, v, sinks, mask, scale)


# ---------------------------------------------------------------------------------------------
# Logit softcapping (Gemma 2): cap * tanh(x / cap)
def softcap(x, cap):
    return x if not cap else torch.tanh(x / cap) * cap


# ---------------------------------------------------------------------------------------------
# lm_head + cross-entropy without the full [tokens x vocab] logits:
#   loss = sum_t [ logsumexp(z_t) - z_t[y_t] ],  z_t = softcap(W h_t),  over tokens with y_t != ignore
# The reference walks the tokens in chunks and recomputes each chunk's logits in backward
# (activation checkpointing), so at most one chunk of logits is alive at a time.
def trained_rows(labels, ignore_index=-100):
    """Indices of the tokens that train (labels != ignore_index). Finding them makes the CPU wait for the
    GPU (the count decides a shape): do it before the forward, while the GPU queue is short, and pass
    `rows` to linear_cross_entropy; inside the loss the wait would drain a queue the CPU built up ahead."""
    return (labels != ignore_index).nonzero().squeeze(1)


def trained_part(h, labels, ignore_index=-100, rows=None):
    """(h, labels) of the trained tokens only, so untrained ones never reach the projection. index_select
    (not a boolean mask) so that neither the gather nor its backward (index_add) waits for the GPU.
    rows=False keeps every row (a fixed shape, for a CUDA graph): untrained ones add zero loss and gradient."""
    if rows is False:
        return h, labels
    rows = trained_rows(labels, ignore_index) if rows is None else rows
    return h.index_select(0, rows), labels.index_select(0, rows)


def linear_cross_entropy_ref(h, weight, labels, softcap_value=None, ignore_index=-100, rows=None, chunk=4096,
                             bias=None):
    """h [N, C], weight [V, C], labels [N] (bias [V]: Phi-2's head) -> summed loss (fp32 scalar).
    rows: trained_rows(labels), if known (False: keep every row, see trained_part)."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, yc):
        z = softcap(F.linear(hc, weight, bias), softcap_value).float()
        return F.cross_entropy(z, yc, ignore_index=ignore_index, reduction="sum")

    h, labels = trained_part(h, labels, ignore_index, rows)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i : i + chunk], labels[i : i + chunk]
        total = total + (checkpoint(part, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else part(hc, yc))
    return total


if triton is not None:
    @triton.jit
    def _ce_rows(Z, Y, LOSS, V, stride, cap, ignore, BLOCK: tl.constexpr, SOFTCAP: tl.constexpr):
        """One row of logits z (raw lm_head output): loss = logsumexp(c) - c[y] with c = cap tanh(z / cap)
        (or c = z), then z is overwritten in place by d loss / d z = (softmax(c) - onehot(y)) * dc/dz.
        A row whose label is `ignore` gets loss 0 and gradient 0."""
        row = tl.program_id(0).to(tl.int64)
        zp = Z + row * stride
        y = tl.load(Y + row)
        valid = y != ignore
        keep = valid.to(tl.float32)
        y = tl.where(valid, y, 0)  # any in-range column; the row is zeroed by `keep`
        m = -float("inf")
        d = 0.0
        for start in range(0, V, BLOCK):  # pass 1: online max and sum of exp
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(zp + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            if SOFTCAP:
                z = cap * (2.0 * tl.sigmoid(2.0 * z / cap) - 1.0)
            m_new = tl.maximum(m, tl.max(z, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        zy = tl.load(zp + y).to(tl.float32)
        if SOFTCAP:
            zy = cap * (2.0 * tl.sigmoid(2.0 * zy / cap) - 1.0)
        tl.store(LOSS + row, (lse - zy) * keep)
        for start in range(0, V, BLOCK):  # pass 2: the gradient, in place
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(zp + cols, mask=cols < V, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = 2.0 * tl.sigmoid(2.0 * z / cap) - 1.0
                g = tl.exp(cap * t - lse) - (cols == y).to(tl.float32)
                g = g * (1.0 - t * t)
            else:
                g = tl.exp(z - lse) - (cols == y).to(tl.float32)
            tl.store(zp + cols, (g * keep).to(Z.dtype.element_ty), mask=cols < V)


_OUT_DTYPE = [hasattr(torch.ops.aten.addmm, "dtype_out")]  # addmm(..., out_dtype=) exists (torch >= 2.8)


def _addmm_fp32(acc, a, b):
    """acc += a @ b for an fp32 acc and bf16/fp16 a, b: on CUDA one GEMM writing fp32, else through a
    half-precision temporary (the GEMM accumulates in fp32 inside either way)."""
    if acc.is_cuda and a.dtype != acc.dtype and _OUT_DTYPE[0]:
        try:
            return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except RuntimeError:  # raised before any work: this build has no such GEMM for these dtypes
            _OUT_DTYPE[0] = False
    acc += a @ b


class _LinearCE(torch.autograd.Function):
    """Summed cross-entropy of softcap(h W^T) without the full logits: tokens go through in chunks sized
    like h itself; each chunk's logits become their own gradient in place (Triton), then
    dh = G W and dW += G^T h (fp32). All gradient work happens in forward; backward scales it."""

    @staticmethod
    def forward(ctx, h, w, b, labels, cap, ignore_index, triton_rows, per_row=False):
        N, C = h.shape
        V = w.shape[0]
        # chunks of ~1024 rows: [1024, V] logits stay small while the matmuls stay efficient
        chunk = max(1, min(N, 1024))
        loss = torch.zeros(N if per_row else (), dtype=torch.float32, device=h.device)  # per_row: each row's
        dh = torch.empty_like(h)  # (then a row's dh is d loss_i / d h_i, scaled in backward by its own gradient)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        db = torch.zeros(V, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[2] else None
        for i in range(0, N, chunk):
            hc, yc = h[i : i + chunk], labels[i : i + chunk]
            z = hc @ w.t() if b is None else torch.addmm(b, hc, w.t())  # [n, V] in the activation dtype
            rows = ce_rows(z, yc, cap, ignore_index, triton_rows)
            if per_row:
                loss[i : i + chunk] = rows
            else:
                loss += rows.sum()
            torch.mm(z, w, out=dh[i : i + chunk])
            if dw is not None:
                _addmm_fp32(dw, z.t(), hc)  # summed over chunks in fp32
            if db is not None:
                db += z.sum(0, dtype=torch.float32)
        ctx.save_for_backward(dh, dw if dw is not None else loss, db if db is not None else loss)
        ctx.has_dw, ctx.has_db, ctx.w_dtype = dw is not None, db is not None, w.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        dh, dw, db = ctx.saved_tensors
        if g.dim():  # (per_row: the head is frozen, see linear_token_logps)
            return dh * g[:, None].to(dh.dtype), None, None, None, None, None, None, None
        return (dh * g.to(dh.dtype), (dw * g).to(ctx.w_dtype) if ctx.has_dw else None,
                (db * g).to(ctx.w_dtype) if ctx.has_db else None, None, None, None, None, None)


def ce_rows(z, y, cap, ignore_index, triton_rows):
    """z [n, V] logits -> per-row loss [n] (fp32), z overwritten by its gradient: _ce_rows or ce_rows_torch."""
    if not triton_rows:
        return ce_rows_torch(z, y, cap, ignore_index)
    rows = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    _ce_rows[(z.shape[0],)](z, y, rows, z.shape[1], z.stride(0), float(cap or 0.0), ignore_index,
                            BLOCK=min(4096, triton.next_power_of_2(z.shape[1])), SOFTCAP=bool(cap), num_warps=8)
    return rows


def ce_rows_torch(z, y, cap, ignore_index):
    """_ce_rows in PyTorch (for CPU tensors): z [n, V] logits -> per-row loss [n] (fp32), and z overwritten
    by its own gradient dloss/dz = (softmax(s) - onehot(y)) * ds/dz, s = cap tanh(z / cap) (s = z without a
    cap, ds/dz = 1 - tanh^2 with one); ignored rows get loss 0 and gradient 0."""
    zf = z.float()  # z itself when it is fp32: worked on in place (4 passes over [n, V], no temporaries)
    t = torch.tanh(zf / cap) if cap else None
    s = t * cap if cap else zf
    keep = y != ignore_index
    yk = torch.where(keep, y, 0)
    target = s.gather(1, yk[:, None])  # [n, 1]
    m = s.amax(1, keepdim=True)
    g = s.sub_(m).exp_()  # exp(s - max)
    total = g.sum(1, keepdim=True)
    g.div_(total)  # softmax(s)
    loss = torch.where(keep, (total.log() + m - target).squeeze(1), 0.0)  # logsumexp(s) - s_y
    g.scatter_add_(1, yk[:, None], -keep[:, None].to(g.dtype))  # - onehot(y) on the kept rows
    g.mul_(keep[:, None])
    if cap:
        g.mul_(t.mul_(t).neg_().add_(1))
    if g is not z:
        z.copy_(g)
    return loss


def linear_cross_entropy_triton(h, weight, labels, softcap_value=None, ignore_index=-100, rows=None, bias=None):
    h, labels = trained_part(h, labels, ignore_index, rows)
    return _LinearCE.apply(h, weight, bias, labels, softcap_value, ignore_index, True)


def linear_cross_entropy_fused(h, weight, labels, softcap_value=None, ignore_index=-100, rows=None, bias=None):
    """The same Function with the rows done by ce_rows_torch: any device. On a CPU it beats the reference
    (no recompute of the logits, no separate softmax backward)."""
    h, labels = trained_part(h, labels, ignore_index, rows)
    return _LinearCE.apply(h, weight, bias, labels, softcap_value, ignore_index, False)


def linear_cross_entropy(h, weight, labels, softcap_value=None, ignore_index=-100, rows=None, bias=None):
    if _triton(h):
        return linear_cross_entropy_triton(h, weight, labels, softcap_value, ignore_index, rows, bias)
    if _FUSED and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return linear_cross_entropy_fused(h, weight, labels, softcap_value, ignore_index, rows, bias)
    return linear_cross_entropy_ref(h, weight, labels, softcap_value, ignore_index, rows, bias=bias)  # no dh


def token_logps_ref(h, head, labels, chunk=256):
    """h [N, C], head: h -> logits [.., V], labels [N] -> log softmax(head(h))[label] per row, [N] fp32; `chunk`
    rows of logits at a time, recomputed in backward (any head: LoRA on it, a trainable one)."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, yc):
        return torch.log_softmax(head(hc).float(), -1).gather(-1, yc[:, None])[:, 0]
    if not len(labels):
        return h.new_zeros(0, dtype=torch.float32)
    return torch.cat([checkpoint(part, h[i : i + chunk], labels[i : i + chunk], use_reentrant=False)
                      for i in range(0, len(labels), chunk)])


def linear_token_logps(h, weight, labels, softcap_value=None, bias=None):
    """token_logps_ref for a frozen plain head softcap(h W^T + b), through the fused cross-entropy (log p = -its
    per-row loss): no [N x V] logits alive, and none recomputed in backward, which scales each row's d loss / d h
    (made in forward, [N, C] like h) by that row's own gradient."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_token_logps takes a frozen head (token_logps_ref trains one)")
    if torch.is_grad_enabled() and h.requires_grad:
        return -_LinearCE.apply(h, weight, bias, labels, softcap_value, -100, _triton(h), True)
    with torch.no_grad():  # (old or reference log-probs: the rows only, no d loss / d h)
        return torch.cat([-ce_rows(F.linear(h[i : i + 1024], weight, bias), labels[i : i + 1024], softcap_value,
                                   -100, _triton(h)) for i in range(0, len(labels), 1024)])


# ---------------------------------------------------------------------------------------------
# Varlen attention: packed rows (or whole rows with a sliding window) through PyTorch's flash varlen kernel,
# each document attending only to itself; the reference is SDPA with attention.attention_mask_for's mask.
FLASH_MAX_HEAD = 256  # flash attention's widest head; wider heads take SDPA with kernels.rows_mask's mask


class PackedRows(NamedTuple):
    """Packed rows for varlen attention. The B rows are flattened to B*T tokens; cu [docs + 1] (int32)
    holds where each document starts (a row start or a position 0), then B*T; max_len is the longest
    document; window the sliding window (None: plain causal)."""
    cu: torch.Tensor
    max_len: int
    window: int | None
    whole: bool = False  # one document per row (whole_rows)


def packed_rows(position_ids, windows, chunk=None) -> dict:
    """PackedRows per window for rows of documents (a position 0 starts one); chunk: Llama 4's chunked layers
    (windows ignored): every `chunk` positions of a document start another (within a chunk = within a document)."""
    B, T = position_ids.shape
    starts = position_ids.eq(0) if chunk is None else (position_ids % chunk).eq(0)
    starts[:, 0] = True
    idx = starts.flatten().nonzero().flatten()
    cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())  # one host sync per forward, not per layer
    return {"chunk": PackedRows(cu, max_len, None)} if chunk else {w: PackedRows(cu, max_len, w) for w in windows}


def whole_rows(B, T, windows, device) -> dict:
    """B rows of T tokens, each one document, as PackedRows (no host sync: every boundary is known)."""
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
    return {w: PackedRows(cu, T, w, True) for w in windows}


@functools.cache
def _varlen():
    """(torch's varlen_attn, its argument names), or (None, set()) before torch 2.10. Imported on first
    use, not with this module: it pulls in torch._dynamo (a second of start-up, and threads that made
    torchrun workers abort at exit now and then)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    import inspect
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)  # the arguments grew over releases


def varlen_usable(x, cfg, windows) -> bool:
    """Flash varlen runs on CUDA in 16-bit, without Gemma 2's score softcap (gpt-oss's sinks: _SinkVarlen); a
    sliding window and a non-default scale need a torch whose varlen_attn takes them."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or cfg.attn_logit_softcapping or \
            cfg.attention_dropout:  # (varlen_attn has no dropout: such rows take the mask path)
        return False
    fn, args = _varlen()
    if fn is None or (windows != {None} and "window_size" not in args):
        return False
    return "scale" in args or not (cfg.query_pre_attn_scalar or cfg.attention_multiplier)


def varlen_attention(q, k, v, rows: PackedRows, scale):
    """q [B, H, T, D], k/v [B, KV, T, D] -> [B, H, T, D]: causal (windowed) attention inside each document
    of the flattened rows; the reference is SDPA with attention_mask_for's block-diagonal mask."""
    B, H, T, D = q.shape
    varlen_attn, args = _varlen()
    if k.shape[1] != H and "enable_gqa" not in args:  # older torch: one K/V head per query head
        k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v))  # [B*T, heads, D]
    kw = {}
    if "window_size" in args:  # flash keeps keys j with i - left <= j <= i + right
        kw["window_size"] = (-1 if rows.window is None else rows.window - 1, 0)
    else:
        kw["is_causal"] = True
    if "scale" in args:
        kw["scale"] = scale
    if "enable_gqa" in args:
        kw["enable_gqa"] = k.shape[1] != H
    y = varlen_attn(q, k, v, rows.cu, rows.cu, rows.max_len, rows.max_len, **kw)
    return y.view(B, T, H, D).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts MLP: token n goes to experts idx[n, :k] with weights w[n, :k]
#   y_n = sum_j w_nj * down_e (act(gate_e x_n) * up_e x_n),   e = idx[n, j]
# gate_up [E, 2I, C] (gate rows first), down [E, C, I]. LoRA per expert (optional, per projection), as
# `lora` = (A1, B1, s1, A2, B2, s2): gate_up_e += s1 B1_e A1_e, down_e += s2 B2_e A2_e with A [E, r, in],
# B [E, out, r] (None: that projection has no adapter), never built as a [E, out, in] delta.
# The reference loops over the experts that were hit (as transformers' eager path does). The grouped path
# sorts the M = N*k (token, expert) pairs by expert and runs one grouped GEMM per product over the sorted
# rows (no host sync, no per-expert launches); its backward is written out (_MoEExperts).
def stack(W):
    """An expert stack given as a tensor, or as a function that makes one and has its .shape (a 4-bit stack:
    dequantized when used and freed after, so one layer's two dequantized stacks are never alive together)."""
    return W() if callable(W) else W


def route(probs, k, bias=None, groups=1, keep=1, norm=True, scale=1.0):
    """Router probabilities [N, E] -> (weights, experts) [N, k]: the top-k of probs, or (bias: GLM-4.5, ERNIE 4.5)
    of probs + bias among the best groups (group_topk) weighted by probs, or (groups without a bias: Mistral 4) of
    probs among the best groups, the others' 0; renormalised to sum 1; times scale."""
    if bias is None and groups == 1:
        w, idx = torch.topk(probs, k, dim=-1)
    else:
        choose = probs.detach() if bias is None else probs.detach() + bias.float().view(-1)
        idx = group_topk(choose, k, groups, keep, float("-inf") if bias is not None else 0.0)
        w = probs.gather(1, idx)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12) if norm else w  # (transformers: + 1e-20 or a 1e-12 floor)
    return (w * scale if scale != 1 else w), idx


# ---------------------------------------------------------------------------------------------
# Plain (ungated) MLP activations: relu^2 (Arcee) and xIELU (Apertus, arXiv:2411.13010),
#   xielu(x) = a_p x^2 + beta x (x > 0),  a_n (expm1(min(x, eps)) - x) + beta x (x <= 0),
#   a_p = softplus(alpha_p), a_n = beta + softplus(alpha_n)
# The kernels keep only x for the backward (autograd would keep the intermediates); xIELU's parameters get their
# gradients from per-program partial sums, added up in PyTorch (P = [a_p, a_n, beta, eps] is made there, so the
# chain to alpha_p and alpha_n through softplus is autograd's).
def relu2_ref(x):
    return F.relu(x).square()


def xielu_ref(x, alpha_p, alpha_n, beta, eps):
    a_p, a_n = F.softplus(alpha_p), beta + F.softplus(alpha_n)
    return torch.where(x > 0, a_p * x * x + beta * x, (torch.expm1(torch.minimum(x, eps)) - x) * a_n + beta * x)


if triton is not None:
    @triton.jit
    def _expm1(m):  # exp(m) - 1 without the cancellation near 0 (a Taylor series there, |error| < 1e-12)
        return tl.where(tl.abs(m) < 1e-2, m * (1.0 + m * (0.5 + m * (1.0 / 6.0 + m / 24.0))), tl.exp(m) - 1.0)

    @triton.jit
    def _plain_fwd(X, Y, P, n, BLOCK: tl.constexpr, XIELU: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        x = tl.load(X + i, mask=m, other=0.0).to(tl.float32)
        if XIELU:
            a_p, a_n, beta, eps = tl.load(P), tl.load(P + 1), tl.load(P + 2), tl.load(P + 3)
            y = tl.where(x > 0, a_p * x * x + beta * x, (_expm1(tl.minimum(x, eps)) - x) * a_n + beta * x)
        else:
            r = tl.maximum(x, 0.0)
            y = r * r
        tl.store(Y + i, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _plain_bwd(DY, X, DX, P, PART, n, BLOCK: tl.constexpr, XIELU: tl.constexpr):
        # dx = dy y'(x); xIELU: this program's sums of dy dy/da_p, dy dy/da_n, dy dy/dbeta, dy dy/deps into PART
        pid = tl.program_id(0)
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        x = tl.load(X + i, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + i, mask=m, other=0.0).to(tl.float32)
        if XIELU:
            a_p, a_n, beta, eps = tl.load(P), tl.load(P + 1), tl.load(P + 2), tl.load(P + 3)
            pos, e = x > 0, _expm1(tl.minimum(x, eps))
            w = tl.where(x < eps, 1.0, tl.where(x == eps, 0.5, 0.0))  # d min(x, eps) / dx (a tie splits, as torch)
            dx = tl.where(pos, 2.0 * a_p * x + beta, a_n * (w * (e + 1.0) - 1.0) + beta)
            tl.store(PART + pid * 4, tl.sum(tl.where(pos, dy * x * x, 0.0)))
            tl.store(PART + pid * 4 + 1, tl.sum(tl.where(pos, 0.0, dy * (e - x))))
            tl.store(PART + pid * 4 + 2, tl.sum(dy * x))
            tl.store(PART + pid * 4 + 3, tl.sum(tl.where(pos, 0.0, dy * a_n * (e + 1.0) * (1.0 - w))))
        else:
            dx = 2.0 * tl.maximum(x, 0.0)
        tl.store(DX + i, (dy * dx).to(DX.dtype.element_ty), mask=m)


class _PlainAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, P):
        x = x.contiguous()
        y, n = torch.empty_like(x), x.numel()
        _plain_fwd[(triton.cdiv(n, 1024),)](x, y, P, n, BLOCK=1024, XIELU=P is not None)
        ctx.save_for_backward(x, P)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, P = ctx.saved_tensors
        dx, n = torch.empty_like(x), x.numel()
        grid = triton.cdiv(n, 1024)
        part = torch.empty(grid, 4, device=x.device, dtype=torch.float32) if P is not None else None
        _plain_bwd[(grid,)](dy.contiguous(), x, dx, P, part, n, BLOCK=1024, XIELU=P is not None)
        return dx, (part.sum(0) if P is not None else None)


def relu2_triton(x):
    return _PlainAct.apply(x, None)


def xielu_triton(x, alpha_p, alpha_n, beta, eps):
    P = torch.stack([t.reshape(()).float() for t in (F.softplus(alpha_p), beta + F.softplus(alpha_n), beta, eps)])
    return _PlainAct.apply(x, P)


def relu2(x):
    return relu2_triton(x) if _triton(x) else relu2_ref(x)


def xielu(x, alpha_p, alpha_n, beta, eps):
    return (xielu_triton if _triton(x) else xielu_ref)(x, alpha_p, alpha_n, beta, eps)


# ---------------------------------------------------------------------------------------------
# Causal depthwise convolution (LFM2's short convolution; the convolutions of Gated DeltaNet and Mamba2), kernel L:
#     out[b, t, c] = bias[c] + sum_{i < L} w[c, i] v[b, t - (L - 1 - i), c]
# a tap that reaches before the row or before the token's document (docs[b, t]: its index) reads 0. Backward:
#     dv[b, s, c] = sum_i w[c, i] dout[b, s + L - 1 - i, c]   (taps within the document)
#     dw[c, i] = sum_{b, t} dout[b, t, c] v[b, t - (L - 1 - i), c];   dbias[c] = sum_{b, t} dout[b, t, c]
# The reference builds L shifted products; the kernel reads each tap in place (per-program partial sums of dw and
# dbias, added up in PyTorch).
def causal_conv1d_ref(v, w, bias=None, docs=None, silu=False):
    """v [B, T, C], w [C, L], bias [C] or None, docs [B, T] or None -> [B, T, C] (then silu'd: Gated DeltaNet's,
    Mamba2's)."""
    T, L = v.shape[1], w.shape[1]
    full = F.pad(v, (0, 0, L - 1, 0))  # [B, L-1+T, C]: v_{t-L+1} .. v_t for every t
    out = bias.to(v.dtype) if bias is not None else 0
    for i in range(L):  # tap i reaches back L-1-i tokens
        tap, lag = full[:, i: i + T] * w[:, i].to(v.dtype), L - 1 - i
        if docs is not None and lag:  # (the tokens before a document's start are another document's)
            same = torch.zeros_like(docs, dtype=torch.bool)
            same[:, lag:] = docs[:, lag:] == docs[:, :-lag]
            tap = tap * same[:, :, None].to(v.dtype)
        out = out + tap
    return F.silu(out) if silu else out


if triton is not None:
    @triton.jit
    def _conv_at(V, W, BIAS, DOCS, b, t, tm, c, cm, T, C, L: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_DOCS: tl.constexpr):
        # the convolution at rows t [BT] of row b (where tm), channels c [BC] (where cm), before any activation: fp32
        acc = tl.zeros((t.shape[0], c.shape[0]), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        if HAS_DOCS:
            d = tl.load(DOCS + b * T + t, mask=tm, other=-1)
        for i in tl.static_range(L):
            src = t - (L - 1 - i)
            m = tm & (src >= 0)
            if HAS_DOCS:
                m = m & (tl.load(DOCS + b * T + src, mask=m, other=-2) == d)
            x = tl.load(V + (b * T + src)[:, None].to(tl.int64) * C + c[None, :], mask=m[:, None] & cm[None, :],
                        other=0.0)
            acc += x.to(tl.float32) * tl.load(W + c * L + i, mask=cm, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _conv_fwd(V, W, BIAS, DOCS, OUT, T, C, L: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr,
                  SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        pid, nt = tl.program_id(0), tl.cdiv(T, BT)
        b, t = pid // nt, (pid % nt) * BT + tl.arange(0, BT)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        tm, cm = t < T, c < C
        acc = _conv_at(V, W, BIAS, DOCS, b, t, tm, c, cm, T, C, L, HAS_BIAS, HAS_DOCS)
        if SILU:  # (one rounding, after the activation)
            acc = acc * tl.sigmoid(acc)
        tl.store(OUT + (b * T + t)[:, None].to(tl.int64) * C + c[None, :], acc.to(OUT.dtype.element_ty),
                 mask=tm[:, None] & cm[None, :])

    @triton.jit
    def _conv_grad(DOUT, V, W, BIAS, DOCS, b, t, tm, c, cm, T, C, L: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_DOCS: tl.constexpr, SILU: tl.constexpr):
        # the gradient of the convolution's output before the activation, at rows t (0 where not tm): with SILU,
        # dout silu'(a), silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))), a recomputed from v (its taps are cached)
        g = tl.load(DOUT + (b * T + t)[:, None].to(tl.int64) * C + c[None, :], mask=tm[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)
        if SILU:
            a = _conv_at(V, W, BIAS, DOCS, b, t, tm, c, cm, T, C, L, HAS_BIAS, HAS_DOCS)
            sig = tl.sigmoid(a)
            g = g * sig * (1.0 + a * (1.0 - sig))
        return g

    @triton.jit
    def _conv_bwd(DOUT, V, W, BIAS, DOCS, DV, DW, DB, T, C, L: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_DOCS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        # dv for this program's rows; its partial sums of dw [C, L] and dbias [C] into DW[pid], DB[pid]
        pid, nt = tl.program_id(0), tl.cdiv(T, BT)
        b, s = pid // nt, (pid % nt) * BT + tl.arange(0, BT)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        sm, cm = s < T, c < C
        both = sm[:, None] & cm[None, :]
        if HAS_DOCS:
            d = tl.load(DOCS + b * T + s, mask=sm, other=-1)
        g_s = _conv_grad(DOUT, V, W, BIAS, DOCS, b, s, sm, c, cm, T, C, L, HAS_BIAS, HAS_DOCS, SILU)
        tl.store(DB + pid.to(tl.int64) * C + c, tl.sum(g_s, axis=0), mask=cm)
        dv = tl.zeros((BT, BC), dtype=tl.float32)
        for i in tl.static_range(L):
            lag = L - 1 - i
            dst, src = s + lag, s - lag  # (dv: the outputs this input feeds; dw: the input this output read)
            md, ms = sm & (dst < T), sm & (src >= 0)
            if HAS_DOCS:
                md = md & (tl.load(DOCS + b * T + dst, mask=md, other=-2) == d)
                ms = ms & (tl.load(DOCS + b * T + src, mask=ms, other=-2) == d)
            w_i = tl.load(W + c * L + i, mask=cm, other=0.0).to(tl.float32)
            dv += _conv_grad(DOUT, V, W, BIAS, DOCS, b, dst, md, c, cm, T, C, L, HAS_BIAS, HAS_DOCS, SILU) * \
                w_i[None, :]
            x = tl.load(V + (b * T + src)[:, None].to(tl.int64) * C + c[None, :], mask=ms[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            tl.store(DW + (pid.to(tl.int64) * C + c) * L + i, tl.sum(g_s * x, axis=0), mask=cm)
        tl.store(DV + (b * T + s)[:, None].to(tl.int64) * C + c[None, :], dv.to(DV.dtype.element_ty), mask=both)


class _CausalConv(torch.autograd.Function):
    BT, BC = 32, 64

    @staticmethod
    def forward(ctx, v, w, bias, docs, silu):
        v, w = v.contiguous(), w.contiguous()
        (B, T, C), L = v.shape, w.shape[1]
        docs = docs.contiguous() if docs is not None else None
        out = torch.empty_like(v)
        grid = (B * triton.cdiv(T, _CausalConv.BT), triton.cdiv(C, _CausalConv.BC))
        ctx.consts = dict(L=L, HAS_BIAS=bias is not None, HAS_DOCS=docs is not None, SILU=silu, BT=_CausalConv.BT,
                          BC=_CausalConv.BC)
        _conv_fwd[grid](v, w, bias, docs, out, T, C, **ctx.consts)
        ctx.save_for_backward(v, w, bias, docs)
        return out

    @staticmethod
    def backward(ctx, dout):
        v, w, bias, docs = ctx.saved_tensors
        (B, T, C), L = v.shape, w.shape[1]
        grid = (B * triton.cdiv(T, _CausalConv.BT), triton.cdiv(C, _CausalConv.BC))
        dv = torch.empty_like(v)
        dw = torch.empty(grid[0], C, L, device=v.device, dtype=torch.float32)
        db = torch.empty(grid[0], C, device=v.device, dtype=torch.float32)
        _conv_bwd[grid](dout.contiguous(), v, w, bias, docs, dv, dw, db, T, C, **ctx.consts)
        return dv, dw.sum(0).to(w.dtype), db.sum(0).to(bias.dtype) if bias is not None else None, None, None


def causal_conv1d_triton(v, w, bias=None, docs=None, silu=False):
    return _CausalConv.apply(v, w, bias, docs, silu)


def causal_conv1d(v, w, bias=None, docs=None, silu=False):
    """The kernel for CUDA tensors (and under the interpreter in tests), the reference elsewhere."""
    return (causal_conv1d_triton if _triton(v) else causal_conv1d_ref)(v, w, bias, docs, silu)


# ---------------------------------------------------------------------------------------------
# Chunk scan: the sequential part of the chunked delta rule (Gated DeltaNet) and of Mamba2's SSD scan. Per row and
# head (b), over the chunks n = 0 .. N-1 of C tokens, a state S [K, V] is carried from chunk to chunk:
#     D_n = U_n - W_n S          (no W: D_n = U_n)          U_n [C, V], W_n [C, K]
#     S_in[n] = S;   S <- g_n S + K_n^T D_n                K_n [C, K], g_n the state's decay over the chunk (scalar)
# Everything else (the UT transform inside a chunk, the outputs from S_in and D) is batched matmuls over all chunks
# at once, in mixers.py. Backward, n = N-1 .. 0, dS the gradient of the state leaving chunk n (the final state's
# gradient first):
#     dD = dD_n + K_n dS;   dU_n = dD;   dW_n = -dD S_in[n]^T;   dK_n = D_n dS^T;   dg_n = <dS, S_in[n]>
#     dS <- g_n dS - W_n^T dD + dS_in[n]
# A column of S reads and writes only its own column, so the kernel runs one program per (b, block of V columns);
# dW, dK and dg sum over V: per-block partial sums, added up in PyTorch. All in fp32.
# The products run on the tensor cores as "tf32x3": each fp32 operand split into a TF32 part and a TF32 remainder,
# three TF32 products summed in fp32 (the remainders' product dropped). Emulated on the CPU that is as accurate as
# fp32 (2.4e-7 to 3.5e-7 of the largest value at [64, 128] x [128, 64], fp32's 3.2e-7 to 3.4e-7; TF32 alone 3e-4);
# on an H100 (triton 3.6, s29-1) the whole scan at Qwen3.5-4B's shape is 8.7e-6 off fp64, "ieee" 1.4e-6, and
# 1.8x / 2.4x faster forward / backward (1.90 / 3.98 ms against 3.36 / 9.37 ms, each at its best pipelining depth).
# "ieee" takes the CUDA cores: at Qwen3.5-4B's shapes the scan took 360 of a step's 1,435 ms of GPU work (s27-8),
# ~5 TFLOP/s. Sm_75 and older have no TF32: Triton compiles these products for the CUDA cores there.
SCAN_DOT = "tf32x3"
# How deep the chunk loop is pipelined, forward and backward, in the order tried (launch_fitting): the fastest on an
# H100 at Qwen3.5-4B's shape (s29-1, tf32x3): forward 1.90 ms 1 deep, 2.57 ms 2 deep; backward 5.53 ms 1 deep,
# 3.98 ms 2 deep, 3 deep over the shared memory (240 KiB). (Forward 3 deep, the old first choice, was not timed.)
SCAN_DEPTHS = ((1,), (2, 1))


def chunk_scan_ref(U, W, K, g, S0=None):
    """U [B, N, C, V], W [B, N, C, K] or None, K [B, N, C, K], g [B, N], S0 [B, K, V] or None -> (D [B, N, C, V]
    (U itself without W), S_in [B, N, K, V], the final state [B, K, V])."""
    S = U.new_zeros(U.shape[0], K.shape[-1], U.shape[-1]) if S0 is None else S0
    Ds, Sin = [], []
    for n in range(U.shape[1]):
        Ds.append(U[:, n] - W[:, n] @ S if W is not None else U[:, n])
        Sin.append(S)
        S = g[:, n, None, None] * S + K[:, n].transpose(-1, -2) @ Ds[-1]
    return (torch.stack(Ds, 1) if W is not None else U), torch.stack(Sin, 1), S


if triton is not None:
    @triton.jit
    def _tile(P, n, R: tl.constexpr, Q: tl.constexpr, r, q, rows, cols):
        # tile [R, Q] at rows r, columns q of matrix n in a stack of [rows, cols] matrices (fp32; 0 outside)
        m = (r < rows)[:, None] & (q < cols)[None, :]
        return tl.load(P + n * rows * cols + r[:, None] * cols + q[None, :], mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _put(P, n, x, r, q, rows, cols):
        m = (r < rows)[:, None] & (q < cols)[None, :]
        tl.store(P + n * rows * cols + r[:, None] * cols + q[None, :], x.to(P.dtype.element_ty), mask=m)

    @triton.jit
    def _scan_fwd(U, W, K, G, S0, D, SIN, SOUT, N, C, KD, V, HAS_W: tl.constexpr, BC: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        c, k, v = tl.arange(0, BC), tl.arange(0, BK), tl.program_id(1) * BV + tl.arange(0, BV)
        S = _tile(S0, b, BK, BV, k, v, KD, V)  # [BK, BV]
        for n in range(N):
            bn = b * N + n
            d = _tile(U, bn, BC, BV, c, v, C, V)  # [BC, BV]
            if HAS_W:
                d -= tl.dot(_tile(W, bn, BC, BK, c, k, C, KD), S, input_precision=DOT)
                _put(D, bn, d, c, v, C, V)
            _put(SIN, bn, S, k, v, KD, V)
            kn = _tile(K, bn, BC, BK, c, k, C, KD)
            S = tl.load(G + bn).to(tl.float32) * S + tl.dot(tl.trans(kn), d, input_precision=DOT)
        _put(SOUT, b, S, k, v, KD, V)

    @triton.jit
    def _scan_bwd(W, K, G, D, SIN, DD, DSIN, DSOUT, DU, DW, DK, DG, DS0, NB, N, C, KD, V, HAS_W: tl.constexpr,
                  BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
        b, vb = tl.program_id(0).to(tl.int64), tl.program_id(1)
        c, k, v = tl.arange(0, BC), tl.arange(0, BK), vb * BV + tl.arange(0, BV)
        dS = _tile(DSOUT, b, BK, BV, k, v, KD, V)
        for i in range(N):
            bn = b * N + N - 1 - i
            pn = vb * NB * N + bn  # this block's partial sums
            dd = tl.dot(_tile(K, bn, BC, BK, c, k, C, KD), dS, input_precision=DOT)  # [BC, BV]
            if HAS_W:
                dd += _tile(DD, bn, BC, BV, c, v, C, V)
            _put(DU, bn, dd, c, v, C, V)
            _put(DK, pn, tl.dot(_tile(D, bn, BC, BV, c, v, C, V), tl.trans(dS), input_precision=DOT), c, k, C, KD)
            s_in = _tile(SIN, bn, BK, BV, k, v, KD, V)
            tl.store(DG + pn, tl.sum(tl.sum(dS * s_in, axis=1), axis=0))
            dS = tl.load(G + bn).to(tl.float32) * dS + _tile(DSIN, bn, BK, BV, k, v, KD, V)
            if HAS_W:
                _put(DW, pn, -tl.dot(dd, tl.trans(s_in), input_precision=DOT), c, k, C, KD)
                dS -= tl.dot(tl.trans(_tile(W, bn, BC, BK, c, k, C, KD)), dd, input_precision=DOT)
        _put(DS0, b, dS, k, v, KD, V)


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def blocks(U, K, backward=False):
        (B, _, C, V), KD = U.shape, K.shape[-1]
        p2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731  (tl.dot wants sides of 16 or more)
        # backward holds ~7 fp32 tiles of [BC or BK, BV] or [BC, BK]: at C 64, K 128 (Qwen3.5) BV 32 (more programs,
        # less shared memory a program); how deep the chunk loop is pipelined: launch_fitting
        BV = min(32 if backward and p2(C) * p2(KD) >= 64 * 128 else 64, p2(V))
        return (B, triton.cdiv(V, BV)), dict(BC=p2(C), BK=p2(KD), BV=BV, DOT=SCAN_DOT)

    @staticmethod
    def forward(ctx, U, W, K, g, S0):
        ctx.dtypes = [t.dtype if t is not None else None for t in (U, W, K, g, S0)]
        U, K, g = U.contiguous(), K.contiguous(), g.contiguous()
        W = W.contiguous() if W is not None else None
        (B, N, C, V), KD = U.shape, K.shape[-1]
        S0 = S0.contiguous() if S0 is not None else U.new_zeros(B, KD, V)
        D = torch.empty_like(U) if W is not None else U
        Sin, S = U.new_empty(B, N, KD, V), U.new_empty(B, KD, V)
        grid, blk = _ChunkScan.blocks(U, K)
        launch_fitting(_scan_fwd, grid, (U, W, K, g, S0, D, Sin, S, N, C, KD, V), dict(HAS_W=W is not None, **blk),
                       num_warps=8 if blk["BK"] >= 128 else 4, depths=SCAN_DEPTHS[0])  # ([128, 64] fp32 state)
        ctx.save_for_backward(W, K, g, D, Sin)
        return (D, Sin, S) if W is not None else (Sin, S)

    @staticmethod
    def backward(ctx, *grads):
        W, K, g, D, Sin = ctx.saved_tensors
        dD, dSin, dS = [t.contiguous() if t is not None else None for t in (grads if W is not None else (None, *grads))]
        (B, N, C, V), KD = D.shape, K.shape[-1]
        grid, blk = _ChunkScan.blocks(D, K, backward=True)
        part = lambda *s: torch.empty(grid[1], B, N, *s, device=D.device, dtype=torch.float32)  # noqa: E731
        dU, dW, dK, dg, dS0 = torch.empty_like(D), part(C, KD), part(C, KD), part(), torch.empty_like(dS)
        launch_fitting(_scan_bwd, grid, (W, K, g, D, Sin, dD, dSin, dS, dU, dW, dK, dg, dS0, B, N, C, KD, V),
                       dict(HAS_W=W is not None, **blk), num_warps=8 if blk["BK"] >= 128 else 4, depths=SCAN_DEPTHS[1])
        out = [dU, dW.sum(0) if W is not None else None, dK.sum(0), dg.sum(0), dS0]
        return tuple(t.to(dt) if dt is not None else None for t, dt in zip(out, ctx.dtypes))


def chunk_scan_triton(U, W, K, g, S0=None):
    out = _ChunkScan.apply(U, W, K, g, S0)
    return out if W is not None else (U, *out)


def chunk_scan(U, W, K, g, S0=None):
    """The kernel for CUDA tensors (and under the interpreter in tests), the reference elsewhere."""
    return (chunk_scan_triton if _triton(U) else chunk_scan_ref)(U, W, K, g, S0)


# ---------------------------------------------------------------------------------------------
# The chunked delta rule inside a chunk (Gated DeltaNet: mixers.py has the rule and the chunked form's derivation).
# Per row b, value head h and chunk n of C tokens (i, j tokens of the chunk; q, k from key head h // (H / Hk)):
#     G = cumsum(g);  D_ij = exp(G_i - G_j) (j <= i, same document; else 0);  gamma_i = exp(G_i) (0 past a start)
#     prep:  M = (beta k k^T) o D (j < i);  A = (I + M)^-1;  U = A (beta v);  W = A (beta gamma k);
#            K_end_j = k_j exp(G_C - G_j) (the chunk's last document only);  gamma_C        -> chunk_scan(U, W, ...)
#     out:   o = (gamma q) S_in + ((q k^T) o D) delta                                      <- delta, S_in
# The output is also Mamba2's SSD within a chunk (q = C, k = B, delta = X_dt, S_in = h_in, g = dt A): chunk_out.
# The Triton kernels run one program per (chunk, row and value head) with the chunk's products on chip, read q, k, v,
# g, beta in the model's [B, T, heads, d] layout (no chunked copies, no repeated key heads) and write o there.
DELTA_DOT = SCAN_DOT  # the in-chunk kernels' products ("ieee": fp32 on the CUDA cores, if tf32x3 is short on a GPU)


def in_chunks(x, C):
    """[B, T, H, ...] -> [B, H, N, C, ...] in fp32 (fp64 stays fp64), zero-padded to whole chunks."""
    x = x.to(torch.promote_types(x.dtype, torch.float32)).transpose(1, 2)
    pad = -x.shape[2] % C
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad)) if pad else x.contiguous()
    return x.view(*x.shape[:2], -1, C, *x.shape[3:])


def _segments(starts, g):
    """starts [B, T] or None, g [B, H, N, C] (chunks) -> each token's document index within its chunk [B, 1, N, C]
    (0: the document carried in from the chunk before)."""
    B, _, N, C = g.shape
    st = torch.zeros(B, N * C, dtype=torch.bool, device=g.device) if starts is None else \
        F.pad(starts, (0, N * C - starts.shape[1]))
    return st.reshape(B, 1, N, C).long().cumsum(-1)


def _delta_decays(g, starts, C):
    """g [B, H, N, C] (chunks), starts [B, T] or None -> D [B, H, N, C, C], gamma and to_end [B, H, N, C]."""
    seg, G = _segments(starts, g), g.cumsum(-1)
    same = (seg[..., :, None] == seg[..., None, :]) & torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    D = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~same, float("-inf")))
    return D, torch.exp(G) * (seg == 0), torch.exp(G[..., -1:] - G) * (seg == seg[..., -1:])


def chunk_ends(k, g, starts, chunk):
    """The scan's K_end [B H, N, C, d] (k from key head h // (H / Hk)) and gamma_C [B H, N] without the [C, C]
    decays: Mamba2's (its B for k; delta_prep makes Gated DeltaNet's). PyTorch, autograd."""
    k, g = in_chunks(k.repeat_interleave(g.shape[2] // k.shape[2], 2), chunk), in_chunks(g, chunk)
    seg, G = _segments(starts, g), g.cumsum(-1)
    to_end = torch.exp(G[..., -1:] - G) * (seg == seg[..., -1:])
    return (k * to_end[..., None]).flatten(0, 1), (torch.exp(G[..., -1]) * (seg[..., -1] == 0)).flatten(0, 1)


def delta_prep_ref(k, v, g, beta, starts=None, chunk=64):
    """k [B, T, Hk, dk], v [B, T, H, dv], g, beta [B, T, H] (H a multiple of Hk), starts [B, T] (True at a document's
    first token) or None -> chunk_scan's inputs: U [B H, N, C, dv], W and K_end [B H, N, C, dk], gamma_C [B H, N]."""
    k = k.repeat_interleave(v.shape[2] // k.shape[2], 2)
    k, v, g, beta = (in_chunks(t, chunk) for t in (k, v, g, beta))
    D, gamma, to_end = _delta_decays(g, starts, chunk)
    kb = k * beta[..., None]
    M = (kb @ k.transpose(-1, -2)) * D.tril(-1)
    eye = torch.eye(chunk, device=k.device, dtype=k.dtype)
    A = torch.linalg.solve_triangular(eye + M, eye.expand_as(M), upper=False, unitriangular=True)  # (I + M)^-1:
    U, W = A @ (v * beta[..., None]), A @ (kb * gamma[..., None])  # (one solve, two matmuls: faster than 2 solves)
    return U.flatten(0, 1), W.flatten(0, 1), (k * to_end[..., None]).flatten(0, 1), gamma[..., -1].flatten(0, 1)


def chunk_out_ref(q, k, g, starts, S_in, delta, dtype=None):
    """q, k [B, T, Hk, dk], g [B, T, H], starts as above, S_in [B H, N, dk, dv] and delta [B H, N, C, dv]
    (chunk_scan's) -> o [B, T, H, dv] in dtype (default: delta's)."""
    (B, T, H), (_, N, C, dv) = g.shape, delta.shape
    q, k = (in_chunks(t.repeat_interleave(H // t.shape[2], 2), C) for t in (q, k))
    D, gamma, _ = _delta_decays(in_chunks(g, C), starts, C)
    S_in, dl = (t.to(q.dtype) for t in (S_in, delta))  # (fp32 from the scan; fp64 in the tests' truth)
    o = (q * gamma[..., None]) @ S_in.view(B, H, N, *S_in.shape[2:]) + \
        ((q @ k.transpose(-1, -2)) * D) @ dl.view(B, H, N, C, dv)  # [B, H, N, C, dv]
    return o.reshape(B, H, -1, dv)[:, :, :T].transpose(1, 2).to(dtype or delta.dtype,
                                                                 memory_format=torch.contiguous_format)


if triton is not None:
    @triton.jit
    def _rows(P, b, t, h, d, ok, T, H, Dd):
        # tile [rows t, columns d] of head h, row b of a [B, T, H, Dd] tensor (fp32; 0 where not ok)
        m = ok[:, None] & (d < Dd)[None, :]
        return tl.load(P + ((b * T + t[:, None]) * H + h) * Dd + d[None, :], mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _put_rows(P, b, t, h, d, ok, T, H, Dd, x):
        m = ok[:, None] & (d < Dd)[None, :]
        tl.store(P + ((b * T + t[:, None]) * H + h) * Dd + d[None, :], x.to(P.dtype.element_ty), mask=m)

    @triton.jit
    def _chunk_program(T, H, C, N, BC: tl.constexpr, BK: tl.constexpr):
        # this program's row b, value head h, chunk bn in the [B H, N, ...] stacks, the chunk's rows c (their tokens
        # t, ok where real), key columns kk
        n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        c = tl.arange(0, BC)
        t = n * C + c
        return bh // H, bh % H, bh * N + n, c, tl.arange(0, BK), t, (c < C) & (t < T)

    @triton.jit
    def _decays(GP, ST, b, h, c, t, ok, T, H, C, HAS_DOCS: tl.constexpr):
        # the chunk's G = cumsum(g), document index seg, D [BC, BC] and gamma [BC] (see above), and G, seg at its end
        G = tl.cumsum(tl.load(GP + (b * T + t) * H + h, mask=ok, other=0.0).to(tl.float32), 0)
        seg = tl.cumsum(tl.load(ST + b * T + t, mask=ok, other=0).to(tl.int32), 0) if HAS_DOCS else c * 0
        same = (seg[:, None] == seg[None, :]) & (c[:, None] >= c[None, :])
        D = tl.where(same, tl.exp(G[:, None] - G[None, :]), 0.0)
        gamma = tl.where(seg == 0, tl.exp(G), 0.0)
        last = c == C - 1  # (past the last token g is 0 and no document starts: the same values)
        return G, seg, D, gamma, tl.sum(tl.where(last, G, 0.0), 0), tl.sum(tl.where(last, seg, 0), 0)

    @triton.jit
    def _unit_lower_inverse(M, c, BC: tl.constexpr):
        # (I + M)^-1 for a strictly lower M [BC, BC], by forward substitution: row i = e_i - sum_{j < i} M_ij row j
        A = tl.where(c[:, None] == c[None, :], 1.0, 0.0)
        for i in range(1, BC):
            m = tl.sum(tl.where(c[:, None] == i, M, 0.0), 0)  # M's row i
            A = tl.where(c[:, None] == i, (tl.where(c == i, 1.0, 0.0) - tl.sum(m[:, None] * A, 0))[None, :], A)
        return A

    @triton.jit
    def _delta_prep_fwd(K, V, GP, BETA, ST, U, W, KE, GC, AI, T, H, HK, C, N, KD, VD, HAS_DOCS: tl.constexpr,
                        BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
        b, h, bn, c, kk, t, ok = _chunk_program(T, H, C, N, BC, BK)
        G, seg, D, gamma, G_C, seg_C = _decays(GP, ST, b, h, c, t, ok, T, H, C, HAS_DOCS)
        beta = tl.load(BETA + (b * T + t) * H + h, mask=ok, other=0.0).to(tl.float32)
        k = _rows(K, b, t, h // (H // HK), kk, ok, T, HK, KD)  # [BC, BK]
        kb = k * beta[:, None]
        M = tl.where(c[:, None] > c[None, :], tl.dot(kb, tl.trans(k), input_precision=DOT) * D, 0.0)
        A = _unit_lower_inverse(M, c, BC)
        _put(AI, bn, A, c, c, C, C)
        _put(W, bn, tl.dot(A, kb * gamma[:, None], input_precision=DOT), c, kk, C, KD)
        _put(KE, bn, k * tl.where(seg == seg_C, tl.exp(G_C - G), 0.0)[:, None], c, kk, C, KD)
        tl.store(GC + bn, tl.sum(tl.where(c == C - 1, gamma, 0.0), 0))
        for v0 in range(0, VD, BV):
            v = v0 + tl.arange(0, BV)
            vb = _rows(V, b, t, h, v, ok, T, H, VD) * beta[:, None]
            _put(U, bn, tl.dot(A, vb, input_precision=DOT), c, v, C, VD)

    @triton.jit
    def _delta_prep_bwd(K, V, GP, BETA, ST, AI, DU, DW, DKE, DGC, DK, DV, DG, DBETA, T, H, HK, C, N, KD, VD,
                        HAS_DOCS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        DOT: tl.constexpr):
        b, h, bn, c, kk, t, ok = _chunk_program(T, H, C, N, BC, BK)
        G, seg, D, gamma, G_C, seg_C = _decays(GP, ST, b, h, c, t, ok, T, H, C, HAS_DOCS)
        beta = tl.load(BETA + (b * T + t) * H + h, mask=ok, other=0.0).to(tl.float32)
        k = _rows(K, b, t, h // (H // HK), kk, ok, T, HK, KD)
        kb = k * beta[:, None]
        A = _tile(AI, bn, BC, BC, c, c, C, C)
        # U = A (beta v): dA = dU (beta v)^T, d(beta v) = A^T dU
        dA, dbeta = tl.zeros([BC, BC], dtype=tl.float32), tl.zeros([BC], dtype=tl.float32)
        for v0 in range(0, VD, BV):
            v = v0 + tl.arange(0, BV)
            vv, du = _rows(V, b, t, h, v, ok, T, H, VD), _tile(DU, bn, BC, BV, c, v, C, VD)
            dA += tl.dot(du, tl.trans(vv * beta[:, None]), input_precision=DOT)
            dvb = tl.dot(tl.trans(A), du, input_precision=DOT)
            _put_rows(DV, b, t, h, v, ok, T, H, VD, dvb * beta[:, None])
            dbeta += tl.sum(vv * dvb, 1)
        # W = A (beta gamma k): likewise; then A = (I + M)^-1: dM = -A^T dA A^T (j < i), M = (kb k^T) o D
        dw = _tile(DW, bn, BC, BK, c, kk, C, KD)
        dA += tl.dot(dw, tl.trans(kb * gamma[:, None]), input_precision=DOT)
        dkbg = tl.dot(tl.trans(A), dw, input_precision=DOT)  # d(beta gamma k)
        dM = -tl.dot(tl.trans(A), tl.dot(dA, tl.trans(A), input_precision=DOT), input_precision=DOT)
        dKK = tl.where(c[:, None] > c[None, :], dM * D, 0.0)  # d(kb k^T)
        dkb = tl.dot(dKK, k, input_precision=DOT) + gamma[:, None] * dkbg  # d(beta k), its two uses
        to_end = tl.where(seg == seg_C, tl.exp(G_C - G), 0.0)
        dke = _tile(DKE, bn, BC, BK, c, kk, C, KD)
        _put_rows(DK, b, t, h, kk, ok, T, H, KD,
                  beta[:, None] * dkb + tl.dot(tl.trans(dKK), kb, input_precision=DOT) + to_end[:, None] * dke)
        tl.store(DBETA + (b * T + t) * H + h, dbeta + tl.sum(k * dkb, 1), mask=ok)
        # dG: through D (M's), gamma (W's and gamma_C) and to_end (K_end's); then g: dg_j = sum_{i >= j} dG_i
        E = dKK * tl.dot(kb, tl.trans(k), input_precision=DOT)  # dD o D
        dgamma = tl.sum(kb * dkbg, 1) + tl.where(c == C - 1, tl.load(DGC + bn), 0.0)
        dte = tl.sum(k * dke, 1) * to_end
        dG = tl.sum(E, 1) - tl.sum(E, 0) + gamma * dgamma - dte + tl.where(c == C - 1, tl.sum(dte, 0), 0.0)
        tl.store(DG + (b * T + t) * H + h, tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG, mask=ok)

    @triton.jit
    def _chunk_out_fwd(Q, K, GP, ST, SIN, DL, O, T, H, HK, C, N, KD, VD, HAS_DOCS: tl.constexpr, BC: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
        b, h, bn, c, kk, t, ok = _chunk_program(T, H, C, N, BC, BK)
        G, seg, D, gamma, G_C, seg_C = _decays(GP, ST, b, h, c, t, ok, T, H, C, HAS_DOCS)
        q, k = _rows(Q, b, t, h // (H // HK), kk, ok, T, HK, KD), _rows(K, b, t, h // (H // HK), kk, ok, T, HK, KD)
        QK = tl.dot(q, tl.trans(k), input_precision=DOT) * D
        qg = q * gamma[:, None]
        for v0 in range(0, VD, BV):
            v = v0 + tl.arange(0, BV)
            o = tl.dot(qg, _tile(SIN, bn, BK, BV, kk, v, KD, VD), input_precision=DOT) + \
                tl.dot(QK, _tile(DL, bn, BC, BV, c, v, C, VD), input_precision=DOT)
            _put_rows(O, b, t, h, v, ok, T, H, VD, o)

    @triton.jit
    def _chunk_out_bwd(Q, K, GP, ST, SIN, DL, DO, DQ, DK, DG, DSIN, DDL, T, H, HK, C, N, KD, VD,
                       HAS_DOCS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       DOT: tl.constexpr):
        b, h, bn, c, kk, t, ok = _chunk_program(T, H, C, N, BC, BK)
        G, seg, D, gamma, G_C, seg_C = _decays(GP, ST, b, h, c, t, ok, T, H, C, HAS_DOCS)
        q, k = _rows(Q, b, t, h // (H // HK), kk, ok, T, HK, KD), _rows(K, b, t, h // (H // HK), kk, ok, T, HK, KD)
        QK = tl.dot(q, tl.trans(k), input_precision=DOT)
        qg = q * gamma[:, None]
        X, dP = tl.zeros([BC, BK], dtype=tl.float32), tl.zeros([BC, BC], dtype=tl.float32)  # dO S_in^T, dO delta^T
        for v0 in range(0, VD, BV):
            v = v0 + tl.arange(0, BV)
            do = _rows(DO, b, t, h, v, ok, T, H, VD)
            X += tl.dot(do, tl.trans(_tile(SIN, bn, BK, BV, kk, v, KD, VD)), input_precision=DOT)
            dP += tl.dot(do, tl.trans(_tile(DL, bn, BC, BV, c, v, C, VD)), input_precision=DOT)
            _put(DSIN, bn, tl.dot(tl.trans(qg), do, input_precision=DOT), kk, v, KD, VD)
            _put(DDL, bn, tl.dot(tl.trans(QK * D), do, input_precision=DOT), c, v, C, VD)
        dPD = dP * D  # d(q k^T)
        _put_rows(DQ, b, t, h, kk, ok, T, H, KD, gamma[:, None] * X + tl.dot(dPD, k, input_precision=DOT))
        _put_rows(DK, b, t, h, kk, ok, T, H, KD, tl.dot(tl.trans(dPD), q, input_precision=DOT))
        E = dPD * QK  # dD o D
        dG = tl.sum(E, 1) - tl.sum(E, 0) + gamma * tl.sum(q * X, 1)
        tl.store(DG + (b * T + t) * H + h, tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG, mask=ok)


def _delta_launch(kernel, grid, args, blk):
    # (the value-block loops pipelined 2 deep where the shared memory holds it: compiled on the CPU, the output
    # kernel asks 176 KiB at 2 deep on sm_90, 128 on sm_89 (~99 available there), 96 at 1 deep)
    launch_fitting(kernel, grid, args, blk, num_warps=8 if blk["BK"] >= 128 else 4, depths=(2, 1))


def _delta_blocks(k, v, C, starts):
    p2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731  (tl.dot wants sides of 16 or more)
    return dict(HAS_DOCS=starts is not None, BC=p2(C), BK=p2(k.shape[-1]), BV=min(64, p2(v.shape[-1])), DOT=DELTA_DOT)


def _key_heads(x, k):
    """A gradient [B, T, H, d] per value head -> per key head [B, T, Hk, d], in k's dtype."""
    B, T, H, d = x.shape
    return x.view(B, T, k.shape[2], H // k.shape[2], d).sum(3).to(k.dtype)


class _DeltaPrep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, g, beta, starts, C):
        k, v, g, beta = (t.contiguous() for t in (k, v, g, beta))
        (B, T, H, VD), (HK, KD), N = v.shape, k.shape[2:], triton.cdiv(v.shape[1], C)
        st = starts.to(torch.int8).contiguous() if starts is not None else g  # (unread without documents)
        out = lambda *s: torch.empty(B * H, N, *s, device=v.device, dtype=torch.float32)  # noqa: E731
        U, W, KE, gC, A = out(C, VD), out(C, KD), out(C, KD), out(), out(C, C)
        blk = _delta_blocks(k, v, C, starts)
        _delta_launch(_delta_prep_fwd, (N, B * H), (k, v, g, beta, st, U, W, KE, gC, A, T, H, HK, C, N, KD, VD), blk)
        ctx.save_for_backward(k, v, g, beta, st, A)
        ctx.blk = blk
        return U, W, KE, gC

    @staticmethod
    def backward(ctx, dU, dW, dKE, dgC):
        k, v, g, beta, st, A = ctx.saved_tensors
        (B, T, H, VD), (HK, KD), (_, N, C, _) = v.shape, k.shape[2:], A.shape
        dk = torch.empty(B, T, H, KD, device=v.device, dtype=torch.float32)
        dv, dg, dbeta = torch.empty_like(v), *(torch.empty_like(g, dtype=torch.float32) for _ in range(2))
        _delta_launch(_delta_prep_bwd, (N, B * H), (k, v, g, beta, st, A, *(t.contiguous() for t in (dU, dW, dKE, dgC)),
                                                    dk, dv, dg, dbeta, T, H, HK, C, N, KD, VD), ctx.blk)
        return _key_heads(dk, k), dv, dg.to(g.dtype), dbeta.to(beta.dtype), None, None


class _ChunkOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, g, starts, S_in, delta, dtype):
        q, k, g, S_in, delta = (t.contiguous() for t in (q, k, g, S_in, delta))
        (B, T, H), (HK, KD), (_, N, C, VD) = g.shape, k.shape[2:], delta.shape
        st = starts.to(torch.int8).contiguous() if starts is not None else g
        o = torch.empty(B, T, H, VD, device=q.device, dtype=dtype)
        blk = _delta_blocks(k, delta, C, starts)
        _delta_launch(_chunk_out_fwd, (N, B * H), (q, k, g, st, S_in, delta, o, T, H, HK, C, N, KD, VD), blk)
        ctx.save_for_backward(q, k, g, st, S_in, delta)
        ctx.blk = blk
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, g, st, S_in, delta = ctx.saved_tensors
        (B, T, H), (HK, KD), (_, N, C, VD) = g.shape, k.shape[2:], delta.shape
        dq, dk = (torch.empty(B, T, H, KD, device=q.device, dtype=torch.float32) for _ in range(2))
        dg, dS, dD = torch.empty(B, T, H, device=q.device, dtype=torch.float32), torch.empty_like(S_in), \
            torch.empty_like(delta)
        _delta_launch(_chunk_out_bwd, (N, B * H), (q, k, g, st, S_in, delta, do.contiguous(), dq, dk, dg, dS, dD,
                                                   T, H, HK, C, N, KD, VD), ctx.blk)
        return _key_heads(dq, q), _key_heads(dk, k), dg.to(g.dtype), None, dS, dD, None


def delta_prep_triton(k, v, g, beta, starts=None, chunk=64):
    return _DeltaPrep.apply(k, v, g, beta, starts, chunk)


def chunk_out_triton(q, k, g, starts, S_in, delta, dtype=None):
    return _ChunkOut.apply(q, k, g, starts, S_in, delta, dtype or delta.dtype)


def delta_prep(k, v, g, beta, starts=None, chunk=64):
    """The kernel for CUDA tensors (and under the interpreter in tests), the reference elsewhere."""
    return (delta_prep_triton if _triton(k) else delta_prep_ref)(k, v, g, beta, starts, chunk)


def chunk_out(q, k, g, starts, S_in, delta, dtype=None):
    return (chunk_out_triton if _triton(q) else chunk_out_ref)(q, k, g, starts, S_in, delta, dtype)


def sparsemixer(scores, eps):
    """PhiMoE's top-2 router (its evaluation path; transformers samples the experts in training): the best expert,
    weighted by a softmax over the experts within a relative 2 eps of it, then the best of the rest alike.
    scores [N, E] -> (weights, experts) [N, 2], not renormalised."""
    ws, idx, s = [], [], scores
    for _ in range(2):
        with torch.no_grad():  # (the masks take no gradient, as in transformers)
            m, i = s.max(-1, keepdim=True)
            drop = (m - scores) / scores.abs().clamp(min=m) > 2 * eps
        ws.append(s.masked_fill(drop, float("-inf")).softmax(-1).gather(-1, i))
        idx.append(i)
        s = s.scatter(-1, i, float("-inf"))
    return torch.cat(ws, -1), torch.cat(idx, -1)


def alibi_slopes(H, bias_max=8, bloom=False):
    """ALiBi's per-head slopes (arXiv:2108.12409) as MPT computes them: 2^(-bias_max i / P), i = 1..P, P the power
    of 2 at or above H; for other H, the odd ones then the even ones, the first H. bloom: as BLOOM / Falcon
    compute them (the same values, rounded otherwise: p the power of 2 at or below H, then odd powers of the
    next base for the rest)."""
    if bloom:
        p = 2 ** math.floor(math.log2(H))
        slopes = torch.pow(torch.tensor(2 ** (-(2 ** -(math.log2(p) - 3)))), torch.arange(1, 1 + p))
        base2 = torch.tensor(2 ** (-(2 ** -(math.log2(2 * p) - 3))))
        extra = torch.pow(base2, torch.arange(1, 1 + 2 * min(p, H - p), 2))
        return torch.cat([slopes, extra]).float()
    P = 2 ** math.ceil(math.log2(H))
    slopes = 1.0 / torch.pow(2, torch.arange(1, P + 1).float() * (bias_max / P))
    return slopes if P == H else torch.cat([slopes[1::2], slopes[::2]])[:H]


def group_topk(s, k, groups=1, keep=1, fill=float("-inf")):
    """s [N, E] -> [N, k]: the k best experts among the `keep` of `groups` equal groups whose two best scores sum
    highest (GLM-4.5 / DeepSeek-V3's router; groups 1: a plain top-k); the other groups' scores become `fill`
    (Mistral 4's: 0)."""
    if groups > 1:
        best = s.view(len(s), groups, -1).topk(2, dim=-1)[0].sum(-1)  # [N, groups]
        kept = torch.zeros_like(best).scatter_(1, best.topk(keep, dim=-1)[1], 1).bool()
        s = s.masked_fill(~kept.repeat_interleave(s.shape[1] // groups, dim=1), fill)
    return torch.topk(s, k, dim=-1)[1]


def moe_experts_ref(x, idx, w, gate_up, down, act, lora=None, biases=None):
    A1, B1, s1, A2, B2, s2 = lora or (None,) * 6
    gate_up, down = stack(gate_up), stack(down)
    b1, b2 = biases or (None, None)
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        tok, slot = (idx == e).nonzero(as_tuple=True)
        xe = x[tok]
        h = F.linear(xe, gate_up[e], None if b1 is None else b1[e])
        if A1 is not None:
            h = h + F.linear(F.linear(xe, A1[e]), B1[e]) * s1
        a = act[1](h) if act[0] == "plain" else gated_act_ref(*h.chunk(2, dim=-1), act)  # (Nemotron-H: relu^2(up))
        y = F.linear(a, down[e], None if b2 is None else b2[e])
        if A2 is not None:
            y = y + F.linear(F.linear(a, A2[e]), B2[e]) * s2
        out.index_add_(0, tok, (y * w[tok, slot, None]).to(out.dtype))
    return out


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def expert_counts(idx, E):
    """How many of the N*k choices picked each expert, [E] fp32 (histc: no host sync, unlike bincount)."""
    flat = idx.flatten()
    return torch.histc(flat.float() if flat.device.type == "cpu" else flat.int(), bins=E, min=0, max=E - 1).float()


# One expert projection over the sorted rows, x [M, in] -> y = x W_e^T + s (x A_e^T) B_e^T  [M, out]
# (row block e of x against expert e; offs[e] = where expert e's rows end). Its backward, with xa = x A^T:
#   g = s dy B [M, r]    dx = dy W + g A    dA_e = g_e^T x_e [r, in]    dB_e = s dy_e^T xa_e [out, r]
# (the last two are grouped over M, the reduction dimension: one [E, ., .] result per expert).
def _expert_proj(x, W, A, B, s, offs):
    """-> (x W^T, its LoRA term s (x A^T) B^T or None, x A^T or None); the consumer adds the two (a row kernel
    reading both, rather than a pass of its own over [M, out])."""
    mm = _grouped_mm_fn()
    y = mm(x, W.transpose(1, 2), offs=offs)
    if A is None:
        return y, None, None
    xa = mm(x, A.transpose(1, 2), offs=offs)
    return y, mm(xa, (B * s).transpose(1, 2), offs=offs), xa


def _expert_proj_backward(dy, x, W, A, B, s, xa, offs, empty, need_dW):
    """-> (dy W, its LoRA term g A or None, dW, dA, dB), as _expert_proj: the consumer adds the two. W may be a
    function (stack); x is used (and dropped) before the two [M, in] results are made: a lower peak."""
    mm, dA = _grouped_mm_fn(), None
    dW = mm(dy.t(), x, offs=offs).masked_fill_(empty[:, None, None], 0) if need_dW else None
    if A is not None:
        g = mm(dy, B * s, offs=offs)
        dA = mm(g.t(), x, offs=offs).masked_fill_(empty[:, None, None], 0)  # an expert with no rows: zero
        dB = mm(dy.t(), xa, offs=offs).mul_(s).masked_fill_(empty[:, None, None], 0)
    del x
    dx = mm(dy, stack(W), offs=offs)
    if A is None:
        return dx, None, dW, None, None
    return dx, mm(g, A, offs=offs), dW, dA, dB


# Row-wise pieces of the expert path, each a Triton kernel with its PyTorch reference; each takes an optional
# second input added to the first (a projection's LoRA term), so no pass of its own adds it:
#   moe_glu:      h [M, 2I] = [g | u] -> a = act(g) * u  [M, I]   (no copies of the two halves; keep_h: h += h2
#                 in place, for the backward)
#   moe_glu_back: da_u [M, I] (the down projection's input gradient for unweighted rows), h, the rows' routing
#                 weights wr [M] -> dh [M, 2I] for da = wr * da_u, and dw [M] = <da_u, a> (the routing weights'
#                 gradient: <dout, y> = <dout W_down + s (dout B) A, a> for y = down(a) with its LoRA)
#   moe_combine:  out_n = sum_j w_nj y[inv[n k + j]]   (y [M, C] sorted by expert; w None: a plain sum)
def _plus(t, t2, inplace=False):
    return t if t2 is None else (t.add_(t2) if inplace else t + t2)


def moe_glu_ref(h, act, h2=None, keep_h=False):
    return gated_act_ref(*_plus(h, h2, keep_h).chunk(2, dim=-1), act)


def moe_glu_back_ref(da_u, h, wr, act, da2=None):
    f = torch.promote_types(h.dtype, torch.float32)
    hh, da_u = h.detach().to(f).requires_grad_(), _plus(da_u.to(f), da2)
    with torch.enable_grad():
        a = moe_glu_ref(hh, act)
    dh, = torch.autograd.grad(a, hh, da_u * wr.to(f)[:, None])
    return dh.to(h.dtype), (da_u * a.detach()).sum(-1)


def moe_combine_ref(y, inv, w, k, y2=None):
    g = _plus(y, y2).index_select(0, inv).view(-1, k, y.shape[1])  # [N, k, C]
    return g.sum(1) if w is None else torch.bmm(w.view(-1, 1, k).to(y.dtype), g).squeeze(1)


# The expert biases' gradients (gpt-oss), over rows sorted by expert (ex [M] each row's expert, offs as above):
#   expert_sums: out [E, N] fp32, out_e = sum over expert e's rows p of wr_p x_p   (d b_e; wr None: 1)
#   row_dot:     out [M] fp32, out_p = <d_p, b_ex[p]>   (the routing weights' share through the bias)
def expert_sums_ref(x, offs, ex, wr=None):
    x = x.float() if wr is None else x.float() * wr.float()[:, None]
    return torch.zeros(offs.shape[0], x.shape[1], device=x.device).index_add_(0, ex, x)


def row_dot_ref(d, b, ex):
    return (d.float() * b.index_select(0, ex).float()).sum(-1)


if triton is not None:
    @triton.jit
    def _load2(P, P2, off, m, HAS_2: tl.constexpr):  # P[off] (+ P2[off]) in fp32
        v = tl.load(P + off, mask=m, other=0.0).to(tl.float32)
        if HAS_2:
            v += tl.load(P2 + off, mask=m, other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _glu_parts(g, u, ACT: tl.constexpr, alpha, limit):
        """(a, da/dg, da/du) in fp32 for ACT 0 SwiGLU, 1 GeGLU, 2 gpt-oss's clamped SwiGLU:
        a = (clamp(u, -l, l) + 1) g' sigmoid(alpha g'), g' = min(g, l) (no gradient where a clamp holds)."""
        if ACT == 2:
            gc = tl.minimum(g, limit)
            s = tl.sigmoid(alpha * gc)
            uc = tl.minimum(tl.maximum(u, -limit), limit) + 1.0
            dg = tl.where(g <= limit, (s + alpha * gc * s * (1.0 - s)) * uc, 0.0)
            du = tl.where((u >= -limit) & (u <= limit), gc * s, 0.0)
            return gc * s * uc, dg, du
        act, dact = _act_parts(g, ACT == 1)
        return act * u, dact * u, act

    @triton.jit
    def _moe_glu_fwd(H, H2, A, I, alpha, limit, BLOCK: tl.constexpr, ACT: tl.constexpr, HAS_2: tl.constexpr,
                     KEEP_H: tl.constexpr):  # one row per program
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < I
        g = _load2(H, H2, row * 2 * I + c, m, HAS_2)
        u = _load2(H, H2, row * 2 * I + I + c, m, HAS_2)
        if KEEP_H:
            tl.store(H + row * 2 * I + c, g.to(H.dtype.element_ty), mask=m)
            tl.store(H + row * 2 * I + I + c, u.to(H.dtype.element_ty), mask=m)
        a, _, _ = _glu_parts(g, u, ACT, alpha, limit)
        tl.store(A + row * I + c, a.to(A.dtype.element_ty), mask=m)

    @triton.jit
    def _moe_glu_bwd(DA, DA2, H, WR, DH, DW, I, alpha, limit, BLOCK: tl.constexpr, ACT: tl.constexpr,
                     HAS_2: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < I
        g = tl.load(H + row * 2 * I + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(H + row * 2 * I + I + c, mask=m, other=0.0).to(tl.float32)
        da = _load2(DA, DA2, row * I + c, m, HAS_2)
        a, dg, du = _glu_parts(g, u, ACT, alpha, limit)
        tl.store(DW + row, tl.sum(da * a, axis=0))
        da = da * tl.load(WR + row).to(tl.float32)
        tl.store(DH + row * 2 * I + c, (da * dg).to(DH.dtype.element_ty), mask=m)
        tl.store(DH + row * 2 * I + I + c, (da * du).to(DH.dtype.element_ty), mask=m)

    @triton.jit
    def _moe_combine(Y, Y2, INV, W, OUT, C, K: tl.constexpr, HAS_W: tl.constexpr, HAS_2: tl.constexpr,
                     BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < C
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            y = _load2(Y, Y2, tl.load(INV + n * K + j) * C + c, m, HAS_2)
            if HAS_W:
                y = y * tl.load(W + n * K + j).to(tl.float32)
            acc += y
        tl.store(OUT + n * C + c, acc.to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _expert_sums(X, WR, OFFS, OUT, N, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        e = tl.program_id(0)  # one expert's contiguous rows [start, end), one block of columns
        c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(OFFS + e - 1, mask=e > 0, other=0)
        end = tl.load(OFFS + e)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            m = r < end
            x = tl.load(X + r[:, None].to(tl.int64) * N + c[None, :], mask=m[:, None] & (c[None, :] < N),
                        other=0.0).to(tl.float32)
            if HAS_W:
                x = x * tl.load(WR + r, mask=m, other=0.0).to(tl.float32)[:, None]
            acc += x
        tl.store(OUT + e * N + c, tl.sum(acc, axis=0), mask=c < N)

    @triton.jit
    def _row_dot(D, B, EX, OUT, C, BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < C
        e = tl.load(EX + p).to(tl.int64)
        d = tl.load(D + p * C + c, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + e * C + c, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + p, tl.sum(d * b, axis=0))


def _act_code(act):
    """-> (ACT, alpha, limit) for the row kernels: 0 SwiGLU, 1 GeGLU, 2 gpt-oss's clamped SwiGLU."""
    if isinstance(act, tuple):
        return 2, float(act[1]), float(act[2])
    return int(act != "silu"), 0.0, 0.0


def moe_glu_triton(h, act, h2=None, keep_h=False):
    M, I = h.shape[0], h.shape[1] // 2
    a = h.new_empty(M, I)
    code, alpha, limit = _act_code(act)
    _moe_glu_fwd[(M,)](h, h if h2 is None else h2, a, I, alpha, limit, BLOCK=triton.next_power_of_2(I), ACT=code,
                       HAS_2=h2 is not None, KEEP_H=keep_h and h2 is not None)
    return a


def moe_glu_back_triton(da_u, h, wr, act, da2=None):
    M, I = da_u.shape
    dh, dw = torch.empty_like(h), da_u.new_empty(M, dtype=torch.float32)
    code, alpha, limit = _act_code(act)
    _moe_glu_bwd[(M,)](da_u, da_u if da2 is None else da2, h, wr.contiguous(), dh, dw, I, alpha, limit,
                       BLOCK=triton.next_power_of_2(I), ACT=code, HAS_2=da2 is not None)
    return dh, dw


def moe_combine_triton(y, inv, w, k, y2=None):
    M, C = y.shape
    out = y.new_empty(M // k, C)
    _moe_combine[(M // k, triton.cdiv(C, 1024))](y, y if y2 is None else y2, inv, y if w is None else w.contiguous(),
                                                 out, C, K=k, HAS_W=w is not None, HAS_2=y2 is not None, BLOCK=1024)
    return out


def expert_sums_triton(x, offs, ex, wr=None):
    N, E = x.shape[1], offs.shape[0]
    out = torch.empty(E, N, device=x.device, dtype=torch.float32)
    _expert_sums[(E, triton.cdiv(N, 128))](x, x if wr is None else wr.contiguous(), offs, out, N, HAS_W=wr is not None,
                                           BLOCK_M=32, BLOCK_N=128)
    return out


def row_dot_triton(d, b, ex):
    M, C = d.shape
    out = torch.empty(M, device=d.device, dtype=torch.float32)
    _row_dot[(M,)](d, b.contiguous(), ex, out, C, BLOCK=triton.next_power_of_2(C))
    return out


def expert_sums(x, offs, ex, wr=None):
    return (expert_sums_triton if _triton(x) else expert_sums_ref)(x, offs, ex, wr)


def row_dot(d, b, ex):
    return (row_dot_triton if _triton(d) else row_dot_ref)(d, b, ex)


def moe_glu(h, act, h2=None, keep_h=False):
    return (moe_glu_triton if _triton(h) else moe_glu_ref)(h, act, h2, keep_h)


def moe_glu_back(da_u, h, wr, act, da2=None):
    return (moe_glu_back_triton if _triton(h) else moe_glu_back_ref)(da_u, h, wr, act, da2)


def moe_combine(y, inv, w, k, y2=None):
    return (moe_combine_triton if _triton(y) else moe_combine_ref)(y, inv, w, k, y2)


class _MoEExperts(torch.autograd.Function):
    """Grouped forward; the combine is a gather by the inverse permutation and a k-term weighted sum (no
    atomics), and so is every backward scatter. Saved: the input, the routing, h = gate_up(x) [M, 2I] and the
    LoRA's x A^T; act(h) is recomputed, the experts' outputs are never kept (the routing weights' gradient comes
    from the down projection's input gradient, moe_glu_back). value False (a recompute whose output is unused):
    the down projection and the combine are skipped and the output is left uninitialised. gpt-oss's expert
    biases b1 [E, 2I], b2 [E, C] join the LoRA terms (each sorted row takes its expert's)."""

    @staticmethod
    def forward(ctx, x, idx, w, gate_up, down, act, s1, s2, value, keep_h, A1, B1, A2, B2, b1, b2):
        (N, k), M, E = idx.shape, idx.numel(), gate_up.shape[0]
        order = idx.flatten().argsort(stable=True)  # sorted row p holds pair order[p] = n*k + j
        inv = torch.empty_like(order).index_put_((order,), torch.arange(M, device=x.device))  # pair -> its row
        counts = expert_counts(idx, E)
        offs = counts.cumsum(0).to(torch.int32)
        ex = idx.flatten().index_select(0, order) if b1 is not None else None  # [M]: each sorted row's expert
        h, h2, xa1 = _expert_proj(x.index_select(0, order // k), stack(gate_up), A1, B1, s1, offs)  # [M, 2I] +LoRA
        if b1 is not None:
            h2 = _plus(b1.index_select(0, ex), h2)
        a = moe_glu(h, act, h2, keep_h)  # [M, I]; h now includes the LoRA term (when it is kept for backward)
        del h2
        if value:
            y, y2, xa2 = _expert_proj(a, stack(down), A2, B2, s2, offs)  # [M, C] (+ LoRA)
            if b2 is not None:
                y2 = _plus(b2.index_select(0, ex), y2)
            out = moe_combine(y, inv, w, k, y2)
        else:
            xa2 = None if A2 is None else _grouped_mm_fn()(a, A2.transpose(1, 2), offs=offs)
            out = x.new_empty(N, x.shape[1])
        ctx.stacks = [W if callable(W) else None for W in (gate_up, down)]  # (a function is not a tensor to save)
        gate_up, down = [None if callable(W) else W for W in (gate_up, down)]
        ctx.save_for_backward(x, w, gate_up, down, A1, B1, A2, B2, h, xa1, xa2, order, inv, offs, counts == 0, ex, b2)
        ctx.act, ctx.s1, ctx.s2, ctx.k = act, s1, s2, k
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, gate_up, down, A1, B1, A2, B2, h, xa1, xa2, order, inv, offs, empty, ex, b2 = ctx.saved_tensors
        N, k, need, mm = x.shape[0], ctx.k, ctx.needs_input_grad, _grouped_mm_fn()
        gate_up, down = [f or W for f, W in zip(ctx.stacks, (gate_up, down))]
        tok = order // k
        d = dout.index_select(0, tok)  # [M, C]: each sorted row's output gradient, before its routing weight
        wr = w.reshape(-1).index_select(0, order)  # [M]: each sorted row's routing weight
        a = moe_glu(h, ctx.act) if A2 is not None or need[4] else None
        da_u, da2 = mm(d, stack(down), offs=offs), None  # [M, I] (+ the LoRA term)
        dA2 = dB2 = d_down = None
        if A2 is not None:  # the down LoRA; its weight gradients take the routing weight on the small [M, r] side
            g = mm(d, B2 * ctx.s2, offs=offs)  # [M, r]
            da2 = mm(g, A2, offs=offs)
            dA2 = mm((g * wr[:, None].to(g.dtype)).t(), a, offs=offs).masked_fill_(empty[:, None, None], 0)
            dB2 = mm(d.t(), xa2 * wr[:, None].to(xa2.dtype), offs=offs).mul_(ctx.s2).masked_fill_(
                empty[:, None, None], 0)
        if need[4]:
            d_down = mm((d * wr[:, None].to(d.dtype)).t(), a, offs=offs).masked_fill_(empty[:, None, None], 0)
        db1 = db2 = dw_b = None
        if b2 is not None:  # d b2_e = sum of expert e's rows of wr * d; the routing weights see <d, b2_e> too
            db2, dw_b = expert_sums(d, offs, ex, wr), row_dot(d, b2, ex)
        del d, a  # (each [M, .] buffer is dropped once used: a lower peak)
        dh, dw_rows = moe_glu_back(da_u, h, wr, ctx.act, da2)
        del da_u, da2
        if dw_b is not None:
            dw_rows = dw_rows + dw_b
            db1 = expert_sums(dh, offs, ex)
        dw = dw_rows.index_select(0, inv).view(N, k).to(w.dtype)
        dxs, dxs2, d_gate_up, dA1, dB1 = _expert_proj_backward(dh, x.index_select(0, tok), gate_up, A1, B1, ctx.s1,
                                                               xa1, offs, empty, need[3])
        del dh
        dx = moe_combine(dxs, inv, None, k, dxs2)
        db1, db2 = (None, None) if b2 is None else (db1.to(b2.dtype), db2.to(b2.dtype))
        return dx, None, dw, d_gate_up, d_down, None, None, None, None, None, dA1, dB1, dA2, dB2, db1, db2


def moe_experts_grouped(x, idx, w, gate_up, down, act, lora=None, biases=None):
    A1, B1, s1, A2, B2, s2 = lora or (None, None, 0.0, None, None, 0.0)
    b1, b2 = biases or (None, None)
    return _MoEExperts.apply(x, idx, w, gate_up, down, act, s1, s2, not skip_value(), torch.is_grad_enabled(),
                             A1, B1, A2, B2, b1, b2)


def moe_experts(x, idx, w, gate_up, down, act, lora=None, biases=None):
    """Grouped GEMMs on CUDA in bf16 (torch's grouped_mm), the reference loop elsewhere. gate_up [E, 2I, C] and
    down [E, C, I]: tensors or functions making them (stack). biases: gpt-oss's (gate_up [E, 2I], down [E, C]).
    act ("plain", f): ungated experts, gate_up [E, I, C] holding the up projections (the reference loop)."""
    plain = isinstance(act, tuple) and act[0] == "plain"  # (ungated experts: the reference loop, on a GPU too)
    if _FUSED and x.is_cuda and x.dtype == torch.bfloat16 and _grouped_mm_fn() is not None and not plain:
        return moe_experts_grouped(x, idx, w, gate_up, down, act, lora, biases)
    return moe_experts_ref(x, idx, w, gate_up, down, act, lora, biases)


class _ExtraGrad(torch.autograd.Function):
    """Identity; backward adds holder["grad"] (broadcast over rows, when set) to the incoming gradient."""

    @staticmethod
    def forward(ctx, x, holder):
        ctx.holder = holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        extra = ctx.holder.get("grad")
        return (g if extra is None else g + extra.to(g.dtype)), None


def extra_grad(x, holder):
    return _ExtraGrad.apply(x, holder) if torch.is_grad_enabled() and x.requires_grad else x


def moe_aux_loss(stats, E):
    """transformers' load-balancing loss over all sparse layers (Switch Transformer, arXiv:2101.03961, eq. 4-6):
    E * sum_e f_e P_e, f_e = the share of top-k choices that picked e, P_e = e's mean router probability, each
    summed over the layers first. stats: per layer (counts [E], summed probabilities [E], rows)."""
    rows = sum(r for _, _, r in stats)
    f = sum(c for c, _, _ in stats) / rows
    p = sum(q for _, q, _ in stats) / rows
    return E * (f * p).sum()


# ---------------------------------------------------------------------------------------------
# LoRA over frozen projections that read the same input (q/k/v, gate/up, or one alone):
#   y_i = x W_i^T (+ b_i) + s_i (x A_i^T) B_i^T        x [N, C], W_i [O_i, C], A_i [r, C], B_i [O_i, r]
# Forward: one skinny GEMM for all the A's (xa = x [A_1; A_2; ..]^T, [N, R]); the LoRA term lands in the
# base GEMM's epilogue (addmm with s_i B_i, cast once per optimizer step), so no [N, O] temporaries and no
# separate add or scale.
# Backward saves only x and xa, never W (a 4-bit W is dequantized again), rank-first products:
#   g_i = s_i dy_i B_i [N, r]    dB_i = s_i dy_i^T xa_i [O_i, r]    dA = [g_1 g_2 ..]^T x [R, C]
#   dx = sum_i dy_i W_i + [g_1 g_2 ..] [A_1; A_2; ..]       (accumulated in place by addmm)
# value=False skips the x W^T GEMMs and returns uninitialised y: for a recompute in which y only feeds a
# residual add (see the recompute hints below), since going backward never needs y itself.
def lora_linear_ref(x, weight_fns, biases, scalings, As, Bs):
    """The same math through autograd (weight_fns[i](dtype) gives W_i; an FP8 one dequantized)."""
    dense = [w.dense(x.dtype) if isinstance(w, Float8Weight) else w for w in (f(x.dtype) for f in weight_fns)]
    return [F.linear(x, w, None if b is None else b.to(x.dtype))
            + F.linear(F.linear(x, a.to(x.dtype)), bb.to(x.dtype)) * s
            for w, b, s, a, bb in zip(dense, biases, scalings, As, Bs)]


def lora_casts(As, Bs, scalings, dt):
    """[A_1; A_2; ..] and s_i B_i in the compute dtype: few kernels (one cat then one cast, no multiply when
    s = 1); always copies, never the parameter itself."""
    A = torch.cat(As).to(dt) if len(As) > 1 else As[0].to(dt, copy=True)
    return A, [b.to(dt, copy=True) if s == 1 else (b * s).to(dt) for b, s in zip(Bs, scalings)]


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fns, biases, scalings, value, cache, *AB):
        n, dt = len(weight_fns), x.dtype
        A, sBs = (_CAST_CACHE if cache else lora_casts)(AB[:n], AB[n:], scalings, dt)  # [R, C], [O_i, r_i]
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ A.t()  # [N, R]
        ys, start, x8 = [], 0, None
        for f, b, sB in zip(weight_fns, biases, sBs):
            r = sB.shape[1]
            if value:
                w = f(dt)
                if isinstance(w, Float8Weight):  # (an FP8 base: its GEMM in FP8, the bias and LoRA term added;
                    x8 = x8 or fp8_rows(x2)  # x rounded to e4m3 once for all the projections that read it)
                    y = fp8_matmul(x2, w, x8=x8)
                    y = y.add_(b.to(dt)) if b is not None else y
                else:
                    y = torch.addmm(b.to(dt), x2, w.t()) if b is not None else x2 @ w.t()
                y.addmm_(xa[:, start : start + r], sB.t())
            else:
                y = x2.new_empty(x2.shape[0], sB.shape[0])
            ys.append(y.view(*x.shape[:-1], sB.shape[0]))
            start += r
        ctx.save_for_backward(x, xa)
        ctx.weight_fns, ctx.scalings, ctx.A, ctx.sBs = weight_fns, scalings, A, sBs  # casts: cached, not copies
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x, xa = ctx.saved_tensors
        dt, scalings = x.dtype, ctx.scalings
        x2 = x.reshape(-1, x.shape[-1])
        uniform = len(set(scalings)) == 1
        if uniform and scalings[0] != 1:
            xa = xa * scalings[0]  # dB_i = s_i dy_i^T xa_i: scale the [N, R] factor once
        dx, gs, dBs, start = None, [], [], 0
        for f, s, sB, dy in zip(ctx.weight_fns, scalings, ctx.sBs, dys):
            r, dy = sB.shape[1], dy.reshape(-1, sB.shape[0])
            w = f(dt)
            if isinstance(w, Float8Weight):
                dx = base_matmul(dy, w, False) if dx is None else dx.add_(base_matmul(dy, w, False))
            else:
                dx = dy @ w if dx is None else dx.addmm_(dy, w)
            del w  # a dequantized 4-bit weight lives only for its own GEMM
            gs.append(dy @ sB)  # [N, r] = s dy B
            dB = dy.t() @ xa[:, start : start + r]  # [O, r]
            dBs.append(dB if uniform else dB.mul_(s))
            start += r
        g = torch.cat(gs, 1) if len(gs) > 1 else gs[0]  # [N, R]
        dA = g.t() @ x2  # [R, C]
        dx.addmm_(g, ctx.A)
        dAs = dA.split([sB.shape[1] for sB in ctx.sBs]) if len(gs) > 1 else (dA,)
        return (dx.view_as(x), None, None, None, None, None, *dAs, *dBs)  # autograd casts to the params' dtype


# Recompute hints: memory.py's checkpointing runs a block again in backward inside hint("recompute"), which
# lets ops tell the recompute from the real forward. In a block y = h + down_proj(a), backward needs
# down_proj's gradient path but never its output: inside `value_unused()`, a projection that can (the
# fused LoRA path, `linear`) skips its base GEMM during the recompute - about a quarter of a block's matmul
# FLOPs in the recompute.
_HINTS = {"recompute": False, "unused": False}


@contextlib.contextmanager
def hint(name, on=True):
    old, _HINTS[name] = _HINTS[name], on
    try:
        yield
    finally:
        _HINTS[name] = old


def value_unused(on=True):
    return hint("unused", on)


def skip_value() -> bool:
    return _HINTS["recompute"] and _HINTS["unused"]


# A plain linear layer with a manual backward, so that a recompute can skip its GEMM (full fine-tuning's
# down_proj, or a frozen one LoRA does not target; see the recompute hints above):
#   y = x W^T + b      dx = dy W      dW = dy^T x      db = sum_rows dy
# It saves (x, W) like F.linear does, whether or not it computes y.
class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, value):
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b) if value else x.new_empty(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # [N, O], [N, C]
        need = ctx.needs_input_grad
        return ((dy2 @ w).view_as(x) if need[0] else None, dy2.t() @ x2 if need[1] else None,
                dy2.sum(0) if need[2] else None, None)


def linear(mod, x):
    """mod(x); a plain nn.Linear goes through _Linear where kernels are on, skipping its GEMM inside
    value_unused() during a recompute. Other module types (LoRA, 4-bit) are called as they are."""
    if _FUSED and type(mod) is torch.nn.Linear:
        return _Linear.apply(x, mod.weight, mod.bias, not skip_value())
    return mod(x)


def lora_linear(x, weight_fns, biases, scalings, As, Bs, value=True):
    """[y_i] for projections sharing x (see above): the fused Function wherever kernels are on (plain
    PyTorch, so CPU tensors work too), else the reference (which ignores `value`)."""
    if _FUSED:  # no cached casts under FSDP (set_cast_cache) or in a CUDA graph, whose replays must cast
        cache = _CAST_CACHE is not None and not (x.is_cuda and torch.cuda.is_current_stream_capturing())
        return list(_LoRALinear.apply(x, list(weight_fns), list(biases), list(scalings), value, cache, *As, *Bs))
    return lora_linear_ref(x, weight_fns, biases, scalings, As, Bs)


# ---------------------------------------------------------------------------------------------
# FP8 frozen weights (LoRA's base, --base_dtype float8): W [O, C] held as e4m3 q with a scale per output row,
# W ~ s[:, None] * q. The base's two GEMMs run in FP8 (torch._scaled_mm: fp32 accumulation, Hopper's FP8 tensor
# cores on a GPU), each operand scaled per row to e4m3's range on the fly (max 448):
#   y  = x W^T = diag(sx) (x / sx)_8 q^T diag(s)              sx_n = max_c |x_nc| / 448
#   dx = dy W  = diag(sg) ((dy s) / sg)_8 q                    sg_n = max_o |dy_no s_o| / 448
# (dy s: the weight's row scales move onto dy's columns, so q is used as it is stored; _scaled_mm wants its second
# operand column-major: q^T is, q takes a transposed copy, 1 byte a value.) The base has no weight gradient.
# References: the same rounding of both operands, multiplied in fp32.
E4M3 = torch.float8_e4m3fn if hasattr(torch, "float8_e4m3fn") else None
E4M3_MAX = 448.0
FP8_FAST_ACCUM = False  # y = x W^T's GEMM with Hopper's fast accumulation (fp32 promotion less often; torchao's
#                         choice for the output GEMM, never for gradients): bench.py's nanotune-fp8fast measures it


class Float8Weight(NamedTuple):
    q: torch.Tensor  # [O, C] e4m3
    scale: torch.Tensor  # [O] fp32

    def dense(self, dtype):
        return (self.q.float() * self.scale[:, None]).to(dtype)


def fp8_rows_ref(t, cols=None):
    """t [N, K] (times cols [K], fp32 per-column scales, when given) -> (e4m3 [N, K], fp32 [N] scales): each row
    scaled so its largest magnitude is e4m3's largest."""
    t = t.detach() if cols is None else t.detach().float() * cols
    amax = t.abs().amax(1).float().clamp(min=1e-12)  # (divided by a tensor: by a Python number, CUDA multiplies
    s = amax / amax.new_tensor(E4M3_MAX)              # by its reciprocal, one ulp off the quotient at times)
    return (t.float() / s[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), s


# The same in one kernel, a program per row: a pass for the row's largest |x c|, a pass writing x c / s in e4m3
# (PyTorch's version is six passes over fp32 temporaries, per GEMM operand: more time than the FP8 GEMM saves).
# Rounded to nearest even on the bits, as PyTorch rounds (Triton's own cast differs from it in the interpreter):
# a normal value (>= 2^-6) drops 20 of fp32's 23 mantissa bits, its exponent rebiased 127 -> 7; a subnormal one
# rounds to a multiple of 2^-9 by one fp32 add of 2^14 (whose ulp is 2^-9).
if triton is not None:
    @triton.jit
    def _fp8_rows_kernel(x_ptr, c_ptr, q_ptr, s_ptr, K, stride, BLOCK: tl.constexpr, COLS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride + k, mask=k < K, other=0.0).to(tl.float32)
            if COLS:
                v = v * tl.load(c_ptr + k, mask=k < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v))
        s = tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-12), 448.0)
        tl.store(s_ptr + row, s)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride + k, mask=k < K, other=0.0).to(tl.float32)
            if COLS:
                v = v * tl.load(c_ptr + k, mask=k < K, other=0.0)
            v = tl.minimum(tl.maximum(tl.math.div_rn(v, s), -448.0), 448.0)
            a = tl.abs(v)
            b = a.to(tl.uint32, bitcast=True)
            normal = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) - (120 << 3)  # exponent (4 bits) and mantissa (3)
            sub = (((a + 16384.0) - 16384.0) * 512.0).to(tl.uint32)  # m * 2^-9, m in 0..8 (8: the first normal)
            bits = tl.where(a >= 0.015625, normal, sub) | ((v.to(tl.uint32, bitcast=True) >> 31) << 7)
            tl.store(q_ptr + row * K + k, bits.to(tl.uint8), mask=k < K)


def fp8_rows_triton(t, cols=None):
    N, K = t.shape
    q = torch.empty(N, K, dtype=E4M3, device=t.device)
    s = torch.empty(N, dtype=torch.float32, device=t.device)
    if N:
        t = t if t.stride(1) == 1 else t.contiguous()
        _fp8_rows_kernel[(N,)](t, t if cols is None else cols.float().contiguous(), q.view(torch.uint8), s, K,
                               t.stride(0), BLOCK=min(2048, triton.next_power_of_2(max(K, 16))), COLS=cols is not None,
                               enable_fp_fusion=False)
    return q, s


def fp8_rows(t, cols=None):
    return fp8_rows_triton(t, cols) if _triton(t) else fp8_rows_ref(t, cols)


# A 1-byte matrix transposed (dx = dy W needs q column-major, and the frozen base keeps one copy of q): a program
# per 64 x 64 tile, read along q's rows and written along the copy's. torch's x.t().contiguous() is an elementwise
# copy whose writes stride by the row length, 4-5x slower on an H100 (s26-4: 215 us for 8B's 14,336 x 4,096).
def transpose_bytes_ref(q):
    return q.t().contiguous()


if triton is not None:
    @triton.jit
    def _transpose_bytes_kernel(x_ptr, y_ptr, R, C, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # x [R, C] -> y [C, R], both row-major
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = (r[:, None] < R) & (c[None, :] < C)
        t = tl.load(x_ptr + r[:, None].to(tl.int64) * C + c[None, :], mask=inside)
        tl.store(y_ptr + c[:, None].to(tl.int64) * R + r[None, :], tl.trans(t), mask=tl.trans(inside))


def transpose_bytes_triton(q):
    R, C = q.shape
    y = torch.empty(C, R, dtype=q.dtype, device=q.device)
    if q.numel():
        grid = (triton.cdiv(R, 64), triton.cdiv(C, 64))
        _transpose_bytes_kernel[grid](q.contiguous().view(torch.uint8), y.view(torch.uint8), R, C, BLOCK=64)
    return y


def transpose_bytes(q):
    return transpose_bytes_triton(q) if _triton(q) else transpose_bytes_ref(q)


def fp8_weight(w) -> Float8Weight:
    return Float8Weight(*fp8_rows(w))


def fp8_matmul_ref(x, w: Float8Weight, transpose=True):
    """x W^T (transpose) or x W through the same e4m3 rounding as fp8_matmul, multiplied in fp32."""
    if transpose:
        xq, sx = fp8_rows_ref(x)
        return ((xq.float() * sx[:, None]) @ w.dense(torch.float32).t()).to(x.dtype)
    gq, sg = fp8_rows_ref(x, w.scale)
    return ((gq.float() * sg[:, None]) @ w.q.float()).to(x.dtype)


@functools.cache
def cpu_row_scaled_mm() -> bool:
    """Whether this torch's CPU torch._scaled_mm takes row scales (2.13's does; 2.11's takes one scale a side)."""
    a = torch.zeros(16, 16, dtype=E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except RuntimeError:
        return False


def fp8_matmul(x, w: Float8Weight, transpose=True, x8=None):
    """x [N, C] W^T -> [N, O] (transpose), or x [N, O] W -> [N, C]: one torch._scaled_mm, in x's dtype. x8: x's
    fp8_rows, made once for the projections that share x (transpose only). (On a GPU the FP8 GEMM takes sides that
    are multiples of 16 and, with row scales, gives bf16: other shapes go through the reference, other dtypes
    through a bf16 result; so does a CPU whose _scaled_mm takes no row scales.)"""
    if (x.shape[0] % 16 or w.q.shape[0] % 16 or w.q.shape[1] % 16) if x.is_cuda else not cpu_row_scaled_mm():
        return fp8_matmul_ref(x, w, transpose)
    out = torch.bfloat16 if x.is_cuda else x.dtype
    if not transpose:
        gq, sg = fp8_rows(x, w.scale)
        ones = torch.ones(1, w.q.shape[1], device=x.device, dtype=torch.float32)
        y = torch._scaled_mm(gq, transpose_bytes(w.q).t(), scale_a=sg[:, None], scale_b=ones, out_dtype=out)
    else:
        xq, sx = x8 or fp8_rows(x)
        y = torch._scaled_mm(xq, w.q.t(), scale_a=sx[:, None], scale_b=w.scale[None, :].contiguous(), out_dtype=out,
                             use_fast_accum=FP8_FAST_ACCUM and x.is_cuda)
    return y.to(x.dtype)


def base_matmul(x, w, transpose=True):
    """x W^T (or x W) for a base weight that is a dense tensor or a Float8Weight."""
    if isinstance(w, Float8Weight):
        return (fp8_matmul if _FUSED else fp8_matmul_ref)(x, w, transpose)
    return x @ w.t() if transpose else x @ w


# ---------------------------------------------------------------------------------------------
# NF4 dequantize (QLoRA / bitsandbytes layout, see quant.py):
#   w[i] = code[q_i] * absmax[i // 64],   q_{2k} = byte_k >> 4,  q_{2k+1} = byte_k & 15   (fp32, then cast)
# A double-quantized absmax is expanded on the way (the reference does it first, in PyTorch):
#   absmax[b] = dyn[absmax_u8[b]] * nested_absmax[b // 256] + offset
def nf4_absmax(absmax, dyn=None, nested_absmax=None, offset=0.0):
    if nested_absmax is None:
        return absmax
    return dyn[absmax.long()] * nested_absmax.repeat_interleave(256)[: absmax.numel()] + offset


def nf4_dequantize_ref(packed, absmax, code, shape, dtype):
    n = math.prod(shape)
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], 1).reshape(-1)[:n].long()  # [n] 4-bit codes, high nibble first
    return (code[q] * absmax.repeat_interleave(64)[:n]).reshape(shape).to(dtype)


if triton is not None:
    @triton.jit
    def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, dyn_ptr, nested_ptr, offset, out_ptr, n,
                               BLOCK: tl.constexpr, NESTED: tl.constexpr, BF16_BITS: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # element indices
        mask = i < n
        byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
        q = tl.where(i % 2 == 0, byte >> 4, byte & 15)
        a = tl.load(absmax_ptr + i // 64, mask=mask, other=0)
        if NESTED:  # launched with enable_fp_fusion=False: a multiply then an add, as PyTorch rounds them
            a = (tl.load(dyn_ptr + a.to(tl.int32), mask=mask, other=0.0)
                 * tl.load(nested_ptr + i // (64 * 256), mask=mask, other=0.0) + offset)
        w = tl.load(code_ptr + q, mask=mask, other=0.0) * a
        if BF16_BITS:  # fp32 -> bf16 round-to-nearest-even on the bits (as torch does, on GPU and interpreter)
            b = w.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(out_ptr + i, b.to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_dequantize_triton(packed, absmax, code, shape, dtype, dyn=None, nested_absmax=None, offset=0.0):
    """One launch per weight, the double-quantized absmax expanded inside."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n, BLOCK = out.numel(), 1024
    bf16, nested = dtype == torch.bfloat16, nested_absmax is not None
    _nf4_dequantize_kernel[(triton.cdiv(n, BLOCK),)](
        packed, absmax, code, dyn if nested else code, nested_absmax if nested else code, float(offset),
        out.view(torch.int16) if bf16 else out, n, BLOCK=BLOCK, NESTED=nested, BF16_BITS=bf16, enable_fp_fusion=False)
    return out


def nf4_dequantize(packed, absmax, code, shape, dtype, dyn=None, nested_absmax=None, offset=0.0):
    if _triton(packed):
        return nf4_dequantize_triton(packed, absmax, code, shape, dtype, dyn, nested_absmax, offset)
    return nf4_dequantize_ref(packed, nf4_absmax(absmax, dyn, nested_absmax, offset), code, shape, dtype)
