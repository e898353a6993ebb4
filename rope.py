"""nanotune RoPE math: the inverse frequencies of every rope scaling a checkpoint may ask for (linear, Llama 3.1,
YaRN, LongRoPE, NTK with a fixed alpha, GGUF's per-frequency factors), the attention factor YaRN and LongRoPE
apply, the cos / sin tables, and adjacent-pair RoPE as a reordering; rope_from_hf reads the scaling from
config.json. model.py builds its tables from these; kernels.rope applies them. References: RoPE
(arXiv:2104.09864), YaRN (arXiv:2309.00071), LongRoPE (arXiv:2402.13753), Llama 3.1 rope scaling (arXiv:2407.21783)."""
import math

import torch

from cli import NanotuneError


def rope_base(theta: float, scaling: dict | None, dim: int) -> float:
    """The base the frequencies are taken from: theta, or HunYuan's NTK with a fixed alpha, a larger base whatever
    the length (theta * alpha^(dim / (dim - 2)))."""
    s = scaling or {}
    return theta * s["alpha"] ** (dim / (dim - 2)) if s.get("rope_type", s.get("type")) == "dynamic" else theta


def rope_inv_freq(dim: int, theta: float, scaling: dict | None, long: bool = False) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/dim), i < dim/2, with the checkpoint's scaling applied. `long`: LongRoPE's
    long factors (for sequences past the original context) instead of its short ones."""
    s = scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    theta = rope_base(theta, s, dim)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "factors":  # GGUF `rope_freqs`: llama.cpp divides each frequency by its factor
        return inv / torch.tensor(s["factors"], dtype=torch.float32)
    if kind == "longrope":  # Phi-3.5 / Phi-4: a searched divisor per frequency (arXiv:2402.13753)
        return inv / torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
    if kind == "linear":  # positions divided by factor == frequencies divided by factor
        return inv / s["factor"]
    if kind == "proportional":  # Gemma 4's full layers: the first partial_rotary_factor of the dim/2 frequencies
        n = int(s.get("partial_rotary_factor", 1.0) * dim // 2)  # (exponents over the whole dim) turn, the rest
        return torch.cat([inv[:n], torch.zeros(dim // 2 - n)]) / (s.get("factor") or 1.0)  # are 0: not rotated
    factor, old_ctx = s.get("factor"), s.get("original_max_position_embeddings")
    if kind == "yarn":  # arXiv:2309.00071: frequencies that turn more than beta_fast times over the old context
        # are kept, fewer than beta_slow times divided by `factor`, a linear ramp over the dims in between
        def dim_turning(n):  # the (fractional) dim index whose frequency turns n times over old_ctx
            return dim * math.log(old_ctx / (n * 2 * math.pi)) / (2 * math.log(theta))
        lo, hi = dim_turning(s.get("beta_fast") or 32), dim_turning(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo if hi > lo else 0.001)).clamp(0, 1)
        return inv / factor * ramp + inv * (1 - ramp)
    if kind == "llama3":
        # wavelengths longer than old_ctx/low are slowed by `factor`, shorter than old_ctx/high kept,
        # and the band between blends the two linearly in old_ctx/wavelength.
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        t = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - t) * scaled / factor + t * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_attention_factor(scaling: dict | None) -> float:
    """YaRN and LongRoPE multiply cos and sin by this (a temperature on the attention logits)."""
    s = scaling or {}
    kind, f = s.get("rope_type", s.get("type")), s.get("factor") or 1.0
    if s.get("attention_factor") is not None or kind not in ("yarn", "longrope"):
        return s.get("attention_factor") or 1.0
    if f <= 1:
        return 1.0
    if kind == "longrope":
        return math.sqrt(1 + math.log(f) / math.log(s["original_max_position_embeddings"]))
    if s.get("mscale") and s.get("mscale_all_dim"):  # DeepSeek-style: a ratio of two of YaRN's 0.1 m ln(f) + 1
        return (0.1 * s["mscale"] * math.log(f) + 1) / (0.1 * s["mscale_all_dim"] * math.log(f) + 1)
    return 0.1 * math.log(f) + 1.0


def deinterleave(x, rot):
    """[..., D] -> the first `rot` dims reordered evens then odds (the rest as they are): rotating adjacent pairs
    (x[2i], x[2i+1]) by frequency i is then rotating halves (x[i], x[i + rot/2]), as kernels.rope does."""
    y = x[..., :rot].unflatten(-1, (rot // 2, 2)).transpose(-1, -2).flatten(-2)
    return y if rot == x.shape[-1] else torch.cat([y, x[..., rot:]], -1)


def rotary(position_ids, inv_freq, factor=1.0):
    """positions [B, T] -> cos, sin [B, T, rot] (halves repeated, as rotate-half wants), times `factor`."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [B, T, rot/2]
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos() * factor, emb.sin() * factor


# ---------------------------------------------------------------------------------------------
# config.json -> the rotation
ROPE_TYPES = ("linear", "llama3", "yarn", "longrope", "dynamic", "proportional")  # (dynamic: with a fixed alpha only)


def rope_from_hf(d: dict, where: str):
    """(theta, scaling or None, local theta or None) from rope_parameters (transformers 5, nested per layer type
    for Gemma 3) or rope_theta / rope_scaling / rope_local_base_freq (transformers 4)."""
    rp = d.get("rope_parameters") or {}
    local = None
    if isinstance(rp.get("full_attention"), dict):  # {"full_attention": {...}, "sliding_attention": {...}}
        sliding = rp.get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise NanotuneError(f"{where}: rope scaling {sliding['rope_type']!r} on sliding layers is not supported "
                                "(their rotation is plain; scaling applies to the full layers).")
        local, rp = sliding.get("rope_theta"), rp["full_attention"]
    local = local or d.get("rope_local_base_freq")
    scaling = dict(d.get("rope_scaling") or rp)
    theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None, local
    if kind not in ROPE_TYPES or kind == "dynamic" and not scaling.get("alpha"):
        raise NanotuneError(f"{where}: rope scaling {kind!r} is not supported ({', '.join(ROPE_TYPES)} are; "
                            "dynamic with a fixed alpha, as HunYuan's).")
    for k in ("rope_theta", "type") + (() if kind == "proportional" else ("partial_rotary_factor",)):
        scaling.pop(k, None)  # (Gemma 4's proportional RoPE keeps its fraction: rope.rope_inv_freq)
    scaling["rope_type"] = kind
    if kind in ("llama3", "yarn", "longrope"):  # transformers: a top-level value wins (Phi-3 keeps it there), but
        first = () if "long_mscale" in scaling else (d.get("original_max_position_embeddings"),)  # not for PhiMoE
        scaling["original_max_position_embeddings"] = next((v for v in (*first, scaling.get(
            "original_max_position_embeddings"), d.get("max_position_embeddings")) if v), None)
    if kind in ("yarn", "longrope") and not scaling.get("factor"):
        scaling["factor"] = d.get("max_position_embeddings") / scaling["original_max_position_embeddings"]
    return theta, scaling, local


# GGUF's rope keys (formats.py's GGUF writer and reader)
def write_gguf(w, scaling, arch):
    """Rope scaling as llama.cpp reads it (w: a gguf writer, arch: the GGUF arch): linear and YaRN as keys; Llama 3.1
    and LongRoPE as divisor tensors (formats.gguf_out_tensors), LongRoPE's attention factor and original context as
    keys."""
    import gguf
    s = scaling or {}
    kind = s.get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s["factor"])
    if kind == "yarn":  # llama.cpp computes YaRN's 0.1 ln(factor) + 1 itself; an explicit factor it cannot take
        untruncated = s.get("truncate") is False and arch != "gpt-oss"  # (gpt-oss: export.py warns)
        if untruncated or any(s.get(k) is not None for k in ("attention_factor", "mscale", "mscale_all_dim")):
            raise NanotuneError("this YaRN config sets attention_factor / mscale / truncate, which llama.cpp's GGUF "
                                "keys cannot express; export --format merged instead.")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s["factor"])
        w.add_float32(f"{arch}.rope.scaling.yarn_beta_fast", float(s.get("beta_fast") or 32))
        w.add_float32(f"{arch}.rope.scaling.yarn_beta_slow", float(s.get("beta_slow") or 1))
    if kind == "longrope":
        w.add_rope_scaling_attn_factors(rope_attention_factor(s))
    if kind in ("yarn", "longrope"):
        w.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"])


def read_gguf(g, tensors) -> dict | None:
    """The inverse of write_gguf (g: a key under the arch -> value; tensors: name -> GGUF tensor)."""
    kind, orig = g("rope.scaling.type"), g("rope.scaling.original_context_length")
    if kind == "linear" and g("rope.scaling.factor"):
        return {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": g("rope.scaling.factor"), "original_max_position_embeddings": orig,
                "beta_fast": g("rope.scaling.yarn_beta_fast", 32.0), "beta_slow": g("rope.scaling.yarn_beta_slow", 1.0)}
    if "rope_factors_long.weight" in tensors:
        return {"rope_type": "longrope", "original_max_position_embeddings": orig,
                "attention_factor": g("rope.scaling.attn_factor"),
                "long_factor": [float(x) for x in tensors["rope_factors_long.weight"].data],
                "short_factor": [float(x) for x in tensors["rope_factors_short.weight"].data]}
    return None
