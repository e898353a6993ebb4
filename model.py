"""nanotune model: one readable decoder for Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2 and Phi-3, and
generate(). Only the network: checkpoints (HF safetensors, GGUF) and the family table live in formats.py, the
tokenizer and chat templates in tokenizer.py, LoRA and 4-bit layers are swapped in by lora.py and quant.py.

Architectures differ only in a few `Config` fields (kv heads, rope scaling, qkv bias, qk norm,
norm offset, embedding scale, activation, sandwich norms, softcaps, sliding window, tied embeddings).
Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`), so safetensors load
without renaming. `Transformer.forward` returns the final hidden states; `logits(h)` applies lm_head,
so a fused loss can own the head and never build [tokens x vocab] logits.

References: Llama (arXiv:2302.13971), RoPE (arXiv:2104.09864), GQA (arXiv:2305.13245),
Gemma 2 (arXiv:2408.00118), Llama 3.1 rope scaling (arXiv:2407.21783).

    from formats import load
    model, tok = load()                      # the default model, SmolLM2-135M-Instruct (GGUF)
    ids = generate(model, tok.chat([{"role": "user", "content": "Hi"}]), max_new_tokens=32, stop_ids=tok.stop_ids)
    print(tok.decode(ids))
"""
import contextlib
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


# ---------------------------------------------------------------------------------------------
# Config: every architecture variant is a field (formats.FAMILIES sets them per family)
@dataclass
class Config:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3" | "factors", ...}
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama `attention_bias` puts a bias on o_proj too
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    norm_offset: float = 0.0  # Gemma: x_norm * (1 + w)
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden_size)
    hidden_act: str = "silu"  # "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    sandwich_norm: bool = False  # Gemma 2: extra norms after attention and MLP
    query_pre_attn_scalar: float | None = None  # Gemma 2: attention scale = this^-0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list | None = None  # per layer "sliding_attention" | "full_attention"
    fused_checkpoint: bool = False  # Phi-3 stores qkv_proj and gate_up_proj fused
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        if not self.sliding_window:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"


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
# The decoder
class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps, self.offset)


def shared_input(x, *mods):
    """[m(x) for m in mods] for projections that read the same x. A module type may compute them
    together through a `project_together(mods, x)` static method (lora.LoRALinear does: one fused call
    for q/k/v and one for gate/up)."""
    together = getattr(type(mods[0]), "project_together", None)
    return together(mods, x) if together else [m(x) for m in mods]


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.scale = (cfg.query_pre_attn_scalar or self.hd) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.sliding = cfg.is_sliding(layer)
        self.layer = layer

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q, k, v = shared_input(x, self.q_proj, self.k_proj, self.v_proj)
        q, k = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, KV, T, D]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = kernels.rope(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = kernels.rope(k.transpose(1, 2), cos, sin)  # [B, KV, T, D]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, KV, S, D], S = cached + T
        if isinstance(mask, PackedRows):  # packed rows on a GPU: flash attention over each document alone
            y = varlen_attention(q, k, v, mask, self.scale)
        elif self.softcap:  # Gemma 2: cap * tanh(scores / cap) before the mask; SDPA cannot do this
            k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))
            s = kernels.softcap((q @ k.transpose(-1, -2)) * self.scale, self.softcap)  # [B, H, T, S]
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            elif T > 1:
                s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            y = F.softmax(s.float(), dim=-1).to(q.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scale, enable_gqa=self.nh != self.nkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = cfg.hidden_act

    def forward(self, x, residual=False):
        """residual: the caller only adds the output to the residual stream, so a recompute for backward
        may skip computing it (kernels.value_unused)."""
        h = kernels.gated_act(*shared_input(x, self.gate_proj, self.up_proj), self.act)
        with kernels.value_unused(residual):
            return kernels.linear(self.down_proj, h)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)  # noqa: E731
        self.self_attn, self.mlp = Attention(cfg, layer), MLP(cfg)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        if cfg.sandwich_norm:  # Gemma 2 names: post_attention_layernorm normalises the attention *output*
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.sandwich = cfg.sandwich_norm

    def forward(self, x, cos, sin, mask, cache=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x), residual=True)


class Decoder(nn.Module):
    """The body ("model." in Hugging Face names): embeddings, blocks, final norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", torch.empty(cfg.rotary_dim // 2), persistent=False)
        self.reset_rope()
        self.gradient_checkpointing = False
        self.offload_activations = False  # with checkpointing: block inputs wait in host memory (kernels.Offload)
        self.varlen = False  # packed rows on a GPU: flash varlen attention instead of a block-diagonal mask

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self):
        c = self.config
        if self.inv_freq.is_meta:
            self.inv_freq = torch.empty(c.rotary_dim // 2)
        with torch.no_grad():
            self.inv_freq.copy_(rope_inv_freq(c.rotary_dim, c.rope_theta, c.rope_scaling))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """input_ids [B, T] -> final hidden states [B, T, C].

        attention_mask [B, S] (1 = real token, 0 = padding; S = cached + T) hides padded keys.
        position_ids [B, T] marks *packed* rows: each position 0 starts a new document and no token
        attends across documents (the SFT packer passes them). cache: a KVCache for generation.
        """
        B, T = input_ids.shape
        offset = cache.pos if cache is not None else 0
        packed = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        c = self.config
        x = self.model.embed_tokens(input_ids)
        if c.embed_scale:  # Gemma: sqrt(hidden) rounded to the activation dtype, as the reference does
            x = x * torch.tensor(c.hidden_size**0.5, dtype=x.dtype)
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, rot/2]
        cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()  # [B, T, rot]
        S = offset + T
        need = attention_mask is not None or packed or (offset > 0 and T > 1)
        masks, windows = {}, {c.sliding_window if layer.self_attn.sliding else None for layer in self.model.layers}
        if self.varlen and packed and attention_mask is None and cache is None and varlen_usable(x, c, windows):
            masks = packed_rows(position_ids, windows)  # no [B, 1, T, T] mask: varlen flash attention
        docs = position_ids.eq(0).cumsum(1) if packed and not masks else None  # [B, T] document index per token
        for w in windows - set(masks):
            if need or (w and S > w):
                masks[w] = attention_mask_for(B, T, offset, attention_mask, docs, w, x.device)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        offload = kernels.Offload(x.device) if ckpt and self.offload_activations else None
        dropout = ckpt and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.model.layers.modules())
        last = self.model.layers[-1]
        for layer in self.model.layers:
            mask = masks.get(c.sliding_window if layer.self_attn.sliding else None)
            if ckpt:  # keep only the block input (on the host with offload); recompute the rest in backward
                with offload.saving(x) if offload and layer is not last else contextlib.nullcontext():
                    x = kernels.checkpoint(layer, x, cos, sin, mask, rng=dropout)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        if offload:
            offload.prefetch_last()  # backward starts with the last block, which was not offloaded
        return self.model.norm(x)

    def run(self, fn, *args, **kwargs):
        """fn(self, *args) as part of this module's forward: dist.py registers `run` as an FSDP forward
        method, so root parameters (lm_head) are gathered while a loss that owns the head uses them.
        Inside fn call `model.forward(...)`, not `model(...)`."""
        return fn(self, *args, **kwargs)

    def logits(self, h):
        """[..., C] hidden states -> [..., V] logits (with Gemma 2's final softcap)."""
        return kernels.softcap(self.lm_head(h), self.config.final_logit_softcapping)


def attention_mask_for(B, T, offset, attention_mask, docs, window, device):
    """Boolean [B, 1, T, S] mask, True = may attend: causal, within `window`, not padding, same document."""
    q = torch.arange(offset, offset + T, device=device)[:, None]  # [T, 1] absolute query index
    k = torch.arange(offset + T, device=device)[None, :]  # [1, S]
    m = (k <= q)[None, None]
    if window:
        m = m & (q - k < window)
    if attention_mask is not None:
        m = m & attention_mask[:, None, None, : offset + T].bool()
    if docs is not None:
        m = m & (docs[:, None, :, None] == docs[:, None, None, :])
    return (m | (k == q)).expand(B, 1, T, offset + T)  # a padded row still sees itself: no NaN rows


class PackedRows(NamedTuple):
    """Packed rows for varlen attention. The B rows are flattened to B*T tokens; cu [docs + 1] (int32)
    holds where each document starts (a row start or a position 0), then B*T; max_len is the longest
    document; window the sliding window (None: plain causal)."""
    cu: torch.Tensor
    max_len: int
    window: int | None


def packed_rows(position_ids, windows) -> dict:
    B, T = position_ids.shape
    starts = position_ids.eq(0)
    starts[:, 0] = True
    idx = starts.flatten().nonzero().flatten()
    cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())  # one host sync per forward, not per layer
    return {w: PackedRows(cu, max_len, w) for w in windows}


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
    """Flash varlen runs on CUDA in 16-bit, without Gemma 2's score softcap; a sliding window and a
    non-default scale need a torch whose varlen_attn takes them."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or cfg.attn_logit_softcapping:
        return False
    fn, args = _varlen()
    if fn is None or (windows != {None} and "window_size" not in args):
        return False
    return "scale" in args or not cfg.query_pre_attn_scalar


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


class KVCache:
    """Preallocated keys/values per layer: [B, KV, max_len, D]; `pos` tokens are filled."""

    def __init__(self, cfg: Config, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0

    def update(self, layer, k, v):
        T = k.shape[2]
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        return self.k[layer][:, :, : self.pos + T], self.v[layer][:, :, : self.pos + T]


# ---------------------------------------------------------------------------------------------
# Generation
def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None) -> int:
    """logits [V] -> one token id: greedy at temperature 0, else softmax(logits / T) within top-k / top-p."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt_ids, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
             stop_ids=(), use_cache=True, seed=None, on_token=None) -> list:
    """New token ids after `prompt_ids` (stop token included when hit). use_cache=False recomputes the
    whole sequence every step (the reference the KV cache is tested against)."""
    device, dtype = model.inv_freq.device, model.lm_head.weight.dtype
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = list(prompt_ids)
    cache = KVCache(model.config, 1, len(ids) + max_new_tokens, device, dtype) if use_cache else None
    step = ids
    out = []
    for _ in range(max_new_tokens):
        h = model(torch.tensor([step], device=device), cache=cache)
        nxt = sample(model.logits(h[0, -1]).float(), temperature, top_k, top_p, gen)
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if nxt in stop_ids:
            break
        ids.append(nxt)
        step = [nxt] if use_cache else ids
    return out
