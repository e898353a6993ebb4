"""nanotune kernels: the small fused ops of a decoder, each as a plain-PyTorch reference.

The references here are the ground truth the model uses on CPU; Triton versions (autograd
Functions with a manual backward) join each one, next to it, and `use_triton(...)` picks
between them. With no CUDA device the references always run.

    import kernels; kernels.use_triton(False)   # force the references anywhere
"""
import math

import torch
import torch.nn.functional as F

try:  # Triton runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (the CI tests)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_TRITON = torch.cuda.is_available() and triton is not None


def use_triton(on: bool):
    """Switch between Triton kernels (CUDA only) and the PyTorch references."""
    global _TRITON
    _TRITON = bool(on) and torch.cuda.is_available() and triton is not None


# ---------------------------------------------------------------------------------------------
# RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w)     offset = 0 (Llama), 1 (Gemma)
# Statistics in fp32, as every reference implementation does; the result in x's dtype.
def rms_norm_ref(x, weight, eps: float, offset: float = 0.0):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma: scale in fp32, then cast
        return (y * (offset + weight.float())).to(x.dtype)
    return weight * y.to(x.dtype)  # Llama: cast, then scale in the weight's dtype


def rms_norm(x, weight, eps: float, offset: float = 0.0):
    return rms_norm_ref(x, weight, eps, offset)


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


def rope(x, cos, sin):
    return rope_ref(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# Gated MLP activation: act(gate) * up, with act = silu (SwiGLU) or tanh-approximate GELU (GeGLU)
def gated_act_ref(gate, up, act: str):
    if act == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


def gated_act(gate, up, act: str):
    return gated_act_ref(gate, up, act)


# ---------------------------------------------------------------------------------------------
# Logit softcapping (Gemma 2): cap * tanh(x / cap)
def softcap(x, cap):
    return x if not cap else torch.tanh(x / cap) * cap


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/dim), i < dim/2, with Llama 3.1 or linear scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "factors":  # GGUF `rope_freqs`: llama.cpp divides each frequency by its factor
        return inv / torch.tensor(scaling["factors"], dtype=torch.float32)
    if kind == "linear":  # positions divided by factor == frequencies divided by factor
        return inv / scaling["factor"]
    if kind == "llama3":
        # wavelengths longer than old_ctx/low are slowed by `factor`, shorter than old_ctx/high kept,
        # and the band between blends the two linearly in old_ctx/wavelength.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        s = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - s) * scaled / factor + s * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    return inv


# ---------------------------------------------------------------------------------------------
# lm_head + cross-entropy without the full [tokens x vocab] logits:
#   loss = sum_t [ logsumexp(z_t) - z_t[y_t] ],  z_t = softcap(W h_t),  over tokens with y_t != ignore
# The reference walks the tokens in chunks and recomputes each chunk's logits in backward
# (activation checkpointing), so at most one chunk of logits is alive at a time.
def linear_cross_entropy_ref(h, weight, labels, softcap_value=None, ignore_index=-100, chunk=4096):
    """h [N, C], weight [V, C], labels [N] -> summed loss (fp32 scalar)."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, yc):
        z = softcap(hc @ weight.t(), softcap_value).float()
        return F.cross_entropy(z, yc, ignore_index=ignore_index, reduction="sum")

    keep = labels != ignore_index  # drop untrained tokens before the projection
    h, labels = h[keep], labels[keep]
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i : i + chunk], labels[i : i + chunk]
        total = total + (checkpoint(part, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else part(hc, yc))
    return total


def linear_cross_entropy(h, weight, labels, softcap_value=None, ignore_index=-100):
    return linear_cross_entropy_ref(h, weight, labels, softcap_value, ignore_index)


# ---------------------------------------------------------------------------------------------
# NF4 dequantize (QLoRA / bitsandbytes layout, see quant.py):
#   w[i] = code[q_i] * absmax[i // 64],   q_{2k} = byte_k >> 4,  q_{2k+1} = byte_k & 15   (fp32, then cast)
# A double-quantized absmax is expanded first (n/64 values, plain PyTorch in both paths):
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
    def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCK: tl.constexpr,
                               BF16_BITS: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # element indices
        mask = i < n
        byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
        q = tl.where(i % 2 == 0, byte >> 4, byte & 15)
        w = tl.load(code_ptr + q, mask=mask, other=0.0) * tl.load(absmax_ptr + i // 64, mask=mask, other=0.0)
        if BF16_BITS:  # fp32 -> bf16 round-to-nearest-even on the bits (as torch does, on GPU and interpreter)
            b = w.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(out_ptr + i, b.to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_dequantize_triton(packed, absmax, code, shape, dtype):
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n, BLOCK = out.numel(), 1024
    bf16 = dtype == torch.bfloat16
    _nf4_dequantize_kernel[(triton.cdiv(n, BLOCK),)](packed, absmax, code, out.view(torch.int16) if bf16 else out,
                                                     n, BLOCK=BLOCK, BF16_BITS=bf16)
    return out


def nf4_dequantize(packed, absmax, code, shape, dtype, dyn=None, nested_absmax=None, offset=0.0):
    absmax = nf4_absmax(absmax, dyn, nested_absmax, offset)
    if _TRITON and packed.is_cuda:
        return nf4_dequantize_triton(packed, absmax, code, shape, dtype)
    return nf4_dequantize_ref(packed, absmax, code, shape, dtype)
