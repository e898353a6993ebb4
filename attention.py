"""nanotune attention: the norms, softmax attention over q/k/v projections (GQA, RoPE, q/k norms, sliding
windows, sinks, softcaps, Gemma 4's shared keys and values), its boolean masks and the KV cache. model.py builds
the blocks around it; `cfg` is model.Config (read by attribute only, so this file imports no model code)."""
import collections
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from rope import deinterleave


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps, self.offset)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * w + b over the last dim (Phi-2; Cohere's has no b)."""

    def __init__(self, dim, eps, bias=True):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


def make_norm(cfg, dim=None):
    dim = dim or cfg.hidden_size
    if cfg.norm_type in ("layer", "layer_nobias"):
        return LayerNorm(dim, cfg.rms_norm_eps, bias=cfg.norm_type == "layer")
    return RMSNorm(dim, cfg.rms_norm_eps, cfg.norm_offset)


def shared_input(x, *mods):
    """[m(x) for m in mods] for projections that read the same x. A module type may compute them
    together through a `project_together(mods, x)` static method (lora.LoRALinear does: one fused call
    for q/k/v and one for gate/up)."""
    together = getattr(type(mods[0]), "project_together", None)
    return together(mods, x) if together else [m(x) for m in mods]


class Attention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.kv_heads_at(layer), cfg.head_dim_at(layer)
        self.sliding, self.rope = cfg.is_sliding(layer), cfg.has_rope(layer) and not cfg.alibi
        self.reuse, self.k_is_v = cfg.kv_source(layer) is not None, cfg.attention_k_eq_v and not self.sliding
        self.v_eps = cfg.rms_norm_eps if cfg.v_norm else None  # Gemma 4
        self.gated = cfg.attn_output_gate  # (Qwen3.5: per head, q_proj's rows are [query, gate])
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd * (2 if self.gated else 1), bias=cfg.qkv_bias)
        if not self.reuse:  # (Gemma 4's KV-shared layers have no k/v of their own)
            self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        if not self.reuse and not self.k_is_v:
            self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm, self.clip, self.eps = cfg.qk_norm, cfg.clip_qkv, cfg.rms_norm_eps
        self.chunked = cfg.is_chunked(layer)  # Llama 4: attends within fixed-size chunks of the row
        self.temperature = bool(cfg.attn_scale) and not (cfg.temperature_nope_only and self.rope)
        if cfg.qk_norm and cfg.qk_norm != "rms_post":  # "head": one norm over each head's D dims (after RoPE:
            #                                            "head_post"); "proj": over all H*D; "rms_post" (Llama 4):
            #                                            weightless, after RoPE, on RoPE layers only
            qd, kd = (self.nh * self.hd, self.nkv * self.hd) if cfg.qk_norm == "proj" else (self.hd, self.hd)
            self.q_norm = RMSNorm(qd, cfg.rms_norm_eps, cfg.norm_offset)
            if not self.reuse:
                self.k_norm = RMSNorm(kd, cfg.rms_norm_eps, cfg.norm_offset)
        self.scale = cfg.attention_multiplier or (cfg.query_pre_attn_scalar or self.hd) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.interleaved = cfg.rotary_dim if cfg.rope_interleaved else 0
        self.layer = layer
        if cfg.attention_sinks:  # gpt-oss: softmax over [scores, sink_h], the sink's share dropped
            self.sinks = nn.Parameter(torch.zeros(self.nh))
        if cfg.attention_dropout:  # (a module, so that checkpointing knows the recompute must repeat its masks)
            self.attn_drop = nn.Dropout(cfg.attention_dropout)

    def forward(self, x, cos, sin, mask, cache=None, kv=None, qscale=None):
        """kv: a dict; Gemma 4's store layers put their final (k, v) in it under their type, the layers that reuse
        them take them from there. qscale [B, 1, T, 1]: the queries' temperature (Llama 4, Ministral 3)."""
        B, T, _ = x.shape
        if self.reuse:
            q = kernels.rope(self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd)).transpose(1, 2), cos, sin)
            return self.attend(q, *kv[self.sliding], mask, B, T)
        if self.k_is_v:  # Gemma 4's full layers: v is k's projection, normed on its own
            q, k = shared_input(x, self.q_proj, self.k_proj)
            v = k
        else:
            q, k, v = shared_input(x, self.q_proj, self.k_proj, self.v_proj)
        gate = None
        if self.gated:
            q, gate = q.view(B, T, self.nh, 2 * self.hd).chunk(2, -1)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        if self.qk_norm == "proj":  # Olmo 2
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip:  # OLMoE
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd)
        v = (F.rms_norm(v, (self.hd,), eps=self.v_eps) if self.v_eps else v).transpose(1, 2)  # [B, KV, T, D]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], [B, KV, T, D]
        if self.interleaved:  # q and k permuted alike leave q k^T as it was: then RoPE on halves
            q, k = deinterleave(q, self.interleaved), deinterleave(k, self.interleaved)
        if self.rope:  # (NoPE layers: none)
            q, k = kernels.rope(q, cos, sin), kernels.rope(k, cos, sin)
        if self.qk_norm == "head_post":  # HunYuan: the per-head norms after RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qk_norm == "rms_post" and self.rope:
            q, k = F.rms_norm(q, (self.hd,), eps=self.eps), F.rms_norm(k, (self.hd,), eps=self.eps)
        if qscale is not None:
            q = q * qscale
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, KV, S, D], S = cached + T
        if kv is not None:
            kv[self.sliding] = k, v
        return self.attend(q, k, v, mask, B, T, gate)

    def attend(self, q, k, v, mask, B, T, gate=None):
        """q [B, H, T, D], k and v [B, KV, S, D] -> the output projection of the attention [B, T, C] (each head's
        output times sigmoid of its gate [B, T, H * D] first, when given)."""
        wide = q.shape[-1] > kernels.FLASH_MAX_HEAD  # (Gemma 4's global heads, 512: no flash attention)
        if isinstance(mask, kernels.PackedRows) and wide:  # SDPA with the mask the rows stand for (none: causal)
            mask = None if mask.whole and mask.window is None else kernels.rows_mask(mask, B, T)
        if hasattr(self, "sinks"):  # gpt-oss: softmax([scores, sink_h]) without the sink's column
            y = kernels.sink_attention(q, k, v, self.sinks, mask, self.scale)
        elif isinstance(mask, kernels.PackedRows):  # packed rows on a GPU: flash attention over each document alone
            y = kernels.varlen_attention(q, k, v, mask, self.scale)
        elif self.softcap:  # Gemma 2: cap * tanh(scores / cap) before the mask; SDPA cannot do this
            k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))
            s = kernels.softcap((q @ k.transpose(-1, -2)) * self.scale, self.softcap)  # [B, H, T, S]
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            elif T > 1:
                s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            p = F.softmax(s.float(), dim=-1).to(q.dtype)
            y = (self.attn_drop(p) if hasattr(self, "attn_drop") else p) @ v
        else:
            drop = self.attn_drop.p if hasattr(self, "attn_drop") and self.training else 0.0
            gqa = self.nh != self.nkv
            if gqa and mask is not None:  # SDPA takes a mask or GQA, not both (else its math kernel, in fp32)
                y = fold_gqa(q, k, v, mask, self.scale, drop)
            else:
                if gqa and wide and q.is_cuda:  # (nor does its memory-efficient kernel take GQA without a mask)
                    k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))
                    gqa = False
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=self.scale,
                                                   is_causal=mask is None and T > 1, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(y if gate is None else y * torch.sigmoid(gate))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3; transformers' DeepseekV3Attention), H heads:
        q        = q_b_proj(rmsnorm(q_a_proj(x)))  (or q_proj(x))      -> per head [q_nope, q_rot]
        c, k_rot = kv_a_proj_with_mqa(x)                                 c: the latent (kv_lora_rank), k_rot: one key
        k_nope, v = kv_b_proj(rmsnorm(c))                                per head; k = [k_nope, k_rot] (k_rot shared)
    RoPE turns q_rot and k_rot only (adjacent pairs when rope_interleave); v may be narrower than q and k. The KV
    cache keeps [rmsnorm(c), rotated k_rot] per token and expands it again with kv_b_proj."""

    sliding = chunked = False  # (what the decoder asks of a layer's attention)

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.temperature = bool(cfg.attn_scale)  # (Mistral 4: the query temperature by position, Ministral 3's)
        ql, self.rank, self.dr, self.dv = cfg.latent
        self.nh, self.hd, self.layer = cfg.num_attention_heads, cfg.head_dim, layer  # hd = nope + rope
        if ql:
            self.q_a_proj = nn.Linear(cfg.hidden_size, ql, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(ql, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(ql, self.nh * self.hd, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.dr, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, self.nh * (self.hd - self.dr + self.dv), bias=False)
        self.o_proj = nn.Linear(self.nh * self.dv, cfg.hidden_size, bias=cfg.o_bias)
        self.scale, self.interleaved = cfg.attention_multiplier or self.hd ** -0.5, cfg.rope_interleaved

    def forward(self, x, cos, sin, mask, cache=None, kv=None, qscale=None):
        (B, T, _), H, dn = x.shape, self.nh, self.hd - self.dr
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_rot = q.view(B, T, H, self.hd).transpose(1, 2).split([dn, self.dr], -1)
        c, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.dr], -1)
        k_rot = k_rot[:, None]  # [B, 1, T, rope]
        if self.interleaved:  # (q and k permuted alike: their products are unchanged)
            q_rot, k_rot = deinterleave(q_rot, self.dr), deinterleave(k_rot, self.dr)
        q_rot, k_rot = kernels.rope(q_rot, cos, sin), kernels.rope(k_rot, cos, sin)
        latent = torch.cat([self.kv_a_layernorm(c)[:, None], k_rot], -1)  # [B, 1, T, rank + rope]
        if cache is not None:
            latent, _ = cache.update(self.layer, latent, None)  # [B, 1, S, rank + rope]
        c, k_rot = latent.split([self.rank, self.dr], -1)
        S = c.shape[2]
        k_nope, v = self.kv_b_proj(c[:, 0]).view(B, S, H, dn + self.dv).transpose(1, 2).split([dn, self.dv], -1)
        q, k = torch.cat([q_nope, q_rot], -1), torch.cat([k_nope, k_rot.expand(B, H, S, self.dr)], -1)
        if qscale is not None:
            q = q * qscale
        if isinstance(mask, kernels.PackedRows) and not mask.whole and self.dv <= self.hd <= kernels.FLASH_MAX_HEAD:
            # packed rows on a GPU: flash varlen, whose heads have one width: v padded to q's, the output cut back
            y = kernels.varlen_attention(q, k, F.pad(v, (0, self.hd - self.dv)), mask, self.scale)[..., : self.dv]
        else:
            if isinstance(mask, kernels.PackedRows):  # (whole rows: causal; heads too wide: the mask they stand for)
                mask = None if mask.whole and mask.window is None else kernels.rows_mask(mask, B, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.dv))


def fold_gqa(q, k, v, mask, scale, drop=0.0):
    """Masked GQA attention as plain attention: q [B, H, T, D] with H = KV * G (head h reads KV head h // G) ->
    [B, KV, G * T, D], each KV head's G query heads as G * T query rows; the mask [B, 1 or H, T, S] repeated for
    them. Every query row sees the keys it saw, so the output [B, H, T, D] is the same; k and v are not copied."""
    (B, H, T, D), KV, S = q.shape, k.shape[1], k.shape[2]
    G = H // KV
    if mask.shape[1] == 1:  # [B, 1, T, S] -> [B, 1, G * T, S]
        m = mask.expand(B, 1, T, S)[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
    else:  # one per head (ALiBi's bias) [B, H, T, S] -> [B, KV, G * T, S]
        m = mask.expand(B, H, T, S).reshape(B, KV, G * T, S)
    y = F.scaled_dot_product_attention(q.reshape(B, KV, G * T, D), k, v, attn_mask=m, dropout_p=drop, scale=scale)
    return y.reshape(B, H, T, D)  # (CUDA's kernels may return [B, G * T, KV, D] memory: a copy then)


def attention_mask_for(B, T, offset, attention_mask, docs, window, device, chunk=None, pos=None, S=None):
    """Boolean [B, 1, T, S] mask, True = may attend: causal, within `window`, not padding, same document; with
    `chunk` (Llama 4) in the same chunk: of the document (packed rows: pos [B, T]), else of the row counted from
    its first real token (as transformers does)."""
    S = offset + T if S is None else S  # (a static decode step's offset is a tensor: S, its keys, is given)
    q = offset + torch.arange(T, device=device)[:, None]  # [T, 1] absolute query index
    k = torch.arange(S, device=device)[None, :]  # [1, S]
    m = (k <= q)[None, None]
    if window:
        m = m & (q - k < window)
    if attention_mask is not None:
        m = m & attention_mask[:, None, None, :S].bool()
    if docs is not None:
        m = m & (docs[:, None, :, None] == docs[:, None, None, :])
    if chunk and pos is not None:
        m = m & ((pos[:, None, :, None] // chunk) == (pos[:, None, None, :] // chunk))
    elif chunk:
        lead = (attention_mask[:, :S].cumsum(-1) == 0).sum(-1)[:, None, None] if attention_mask is not \
            None else torch.zeros(1, 1, 1, dtype=torch.long, device=device)  # [B, 1, 1] leading pads
        m = m & (((q[None] - lead) // chunk) == ((k[None] - lead) // chunk))[:, None]
    return (m | (k == q)).expand(B, 1, T, S)  # a padded row still sees itself: no NaN rows


class KVCache:
    """Preallocated keys/values per layer: [B, KV, max_len, D]; `pos` tokens are filled. A static decode step (one
    that a CUDA graph replays, grpo.GraphDecoder) names no position on the host: it writes at `at`, a 0-dim tensor,
    and reads the first `span` keys (the causal mask hides those past `at`)."""

    def __init__(self, cfg, batch: int, max_len: int, device, dtype):
        types = cfg.layer_types or [""] * cfg.num_hidden_layers  # (none where a layer carries a recurrent state
        shapes = [None if types[i] in ("conv", "linear_attention", "mlp") or cfg.kv_source(i) is not None else  # or
                  (batch, cfg.kv_heads_at(i), max_len, cfg.head_dim_at(i))  # reuses another layer's k and v, or
                  for i in range(cfg.num_hidden_layers)]  # has no attention: Nemotron-H's MLP layers)
        if cfg.latent:  # (LatentAttention's: its latent and rotated key per token, no v)
            shapes = [(batch, 1, max_len, cfg.latent[1] + cfg.latent[2])] * cfg.num_hidden_layers
        self.k = [torch.zeros(s, device=device, dtype=dtype) if s else None for s in shapes]
        self.v = [None if cfg.latent or k is None else torch.zeros_like(k) for k in self.k]
        self.pos, self.states = 0, collections.defaultdict(dict)  # (states: LFM2's convolution layers', by index)
        self.at, self.span = None, None

    def rows(self, r0, r1):
        """Rows r0:r1 as a cache of their own (views: a forward's keys and values land in this cache's buffers) at
        this cache's position (Decoding.prefill in row chunks; a recurrent state would stay in the view)."""
        view = copy.copy(self)
        view.k, view.v = ([None if t is None else t[r0:r1] for t in kv] for kv in (self.k, self.v))
        return view

    def update(self, layer, k, v):
        T = k.shape[2]
        if self.at is not None:  # (static: index_copy_ at the position tensor)
            idx = self.at + torch.arange(T, device=k.device)
            self.k[layer].index_copy_(2, idx, k)
            if v is not None:
                self.v[layer].index_copy_(2, idx, v)
            return self.k[layer][:, :, : self.span], v if v is None else self.v[layer][:, :, : self.span]
        self.k[layer][:, :, self.pos : self.pos + T] = k
        if v is not None:
            self.v[layer][:, :, self.pos : self.pos + T] = v
        return self.k[layer][:, :, : self.pos + T], v if v is None else self.v[layer][:, :, : self.pos + T]


def alibi_bias(c, B, S, attention_mask, pos, x):
    """ALiBi's bias [B or 1, H, 1, S] over the S keys: MPT's slope_h (j - (S - 1)); Falcon's slope_h p_j rounded
    to bf16 (as transformers multiplies), / sqrt(head_dim), p_j the key's position from its row's first real token
    (pos: a packed document's own)."""
    if c.alibi == "mpt":
        return (kernels.alibi_slopes(c.num_attention_heads)[:, None] * (torch.arange(S) - (S - 1)).float()).to(
            x.device, x.dtype)[None, :, None]
    if pos is None:
        am = attention_mask[:, :S] if attention_mask is not None else torch.ones(1, S, dtype=torch.long,
                                                                                  device=x.device)
        pos = (am.cumsum(-1) - 1) * am
    slopes = kernels.alibi_slopes(c.num_attention_heads, bloom=True).to(x.device).bfloat16()
    return ((slopes[None, :, None] * pos[:, None, :]).to(x.dtype) / c.head_dim**0.5)[:, :, None]
