"""nanotune model: one readable decoder for every family of families.py, and generate(). Only the network:
checkpoints (HF safetensors, GGUF) live in formats.py, the family table in families.py, the tokenizer and chat
templates in tokenizer.py, RoPE's frequencies in rope.py, the norms, attention, masks and KV cache in attention.py;
LoRA, 4-bit layers and block checkpointing are applied to a built model by lora.py, quant.py and memory.py.

Architectures differ only in `Config` fields (kv heads, rope scaling, qkv bias, qk norm, norm offset, embedding
scale, activation, sandwich norms, softcaps, sliding window, tied embeddings, token mixers ...). Parameter names are
Hugging Face's (`model.layers.0.self_attn.q_proj.weight`): safetensors load without renaming. `Transformer.forward`
returns the final hidden states; `logits(h)` applies lm_head, so a fused loss can own the head and never build
[tokens x vocab] logits. Generation decodes through `Decoding`: a KV cache for a batch of left-padded rows, whose
step can run static (at a position tensor) and, on CUDA, be replayed as a CUDA graph. References (arXiv): Llama
2302.13971, RoPE 2104.09864, GQA 2305.13245, Gemma 2 2408.00118, Llama 3.1's rope scaling 2407.21783.

    from formats import load
    model, tok = load()                      # the default model, SmolLM2-135M-Instruct (GGUF)
    ids = generate(model, tok.chat([{"role": "user", "content": "Hi"}]), max_new_tokens=32, stop_ids=tok.stop_ids)
    print(tok.decode(ids))
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from attention import Attention, KVCache, LatentAttention, alibi_bias, attention_mask_for, make_norm
from mixers import GatedDeltaNet, Mamba2, ShortConv
from mlp import MLP, Experts, MoE
from rope import rope_attention_factor, rope_inv_freq, rotary


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
    rms_norm_eps: float = 1e-6  # the epsilon of every norm (LayerNorm's too)
    norm_type: str = "rms"  # "rms" | "layer" (LayerNorm with bias: Phi-2) | "layer_nobias" (Cohere)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3" | "yarn" | "longrope" | "factors", ...}
    local_rope_theta: float | None = None  # Gemma 3: sliding layers rotate with this base, unscaled
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated
    rope_interleaved: bool = False  # RoPE rotates adjacent pairs (x[2i], x[2i+1]), not halves (ERNIE 4.5, GLM-4)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama `attention_bias` puts a bias on o_proj too
    mlp_bias: bool = False  # Phi-2: biases on the MLP projections
    lm_head_bias: bool = False  # Phi-2
    qk_norm: str | None = None  # RMSNorm on q, k: "head" (Qwen3) | "proj" (Olmo 2: all heads) | "head_post" (HunYuan)
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to +-this (after the norms)
    norm_offset: float = 0.0  # Gemma: x_norm * (1 + w)
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden_size)
    hidden_act: str = "silu"  # "silu" (SwiGLU) or tanh-GELU ("gelu_pytorch_tanh" / "gelu_new", GeGLU); "relu2"
    #                           (relu(x)^2, Arcee) in a plain MLP only
    gated_mlp: bool = True  # False: down(act(up(x))) (Phi-2's fc1 / fc2)
    pre_norm: bool = True  # norm the input of attention and of the MLP (every family but Olmo 2)
    post_norm: bool = False  # norm the output of attention and of the MLP (Gemma 2/3 with pre_norm, Olmo 2)
    parallel_block: bool = False  # Phi-2: x + attn(norm(x)) + mlp(norm(x)), one norm
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: attention scale = this^-0.5
    attention_multiplier: float | None = None  # Granite: the attention scale itself
    embedding_multiplier: float = 1.0  # Granite: embeddings * this
    residual_multiplier: float = 1.0  # Granite: x + branch * this
    logits_scaling: float = 1.0  # Granite: logits / this
    logit_scale: float = 1.0  # Cohere: logits * this
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list | None = None  # per layer "sliding_attention" | "full_attention" | "conv" | "linear_attention"
    conv_kernel: int = 0  # LFM2: "conv" layers mix tokens by mixers.ShortConv, this many taps (with conv_bias)
    conv_bias: bool = False
    linear_heads: tuple = ()  # Qwen3.5's linear attention: (key heads, value heads, key dim, value dim, conv taps)
    attn_output_gate: bool = False  # Qwen3.5: q_proj also yields a gate per head; attention output * sigmoid(gate)
    latent: tuple = ()  # multi-head latent attention (DeepSeek-V3): (q_lora_rank or 0, kv_lora_rank, rope dim, v dim)
    ssm: tuple = ()  # Granite 4.0-H's Mamba2: heads, head dim, groups, state, conv taps, conv / proj bias, chunk, dt
    shared_mlp: int = 0  # Granite 4.0-H: a dense MLP this wide beside the experts (alone when there are none)
    moe_latent_size: int = 0  # Nemotron-H: the routed experts work in this width (fc1_latent_proj in, fc2 out)
    single_mixer: bool = False  # Nemotron-H: each layer x + mixer(norm(x)), one mixer by its type (Mamba2 | attention
    #                             | MLP | MoE)
    no_rope_layers: list | None = None  # per layer 1 = RoPE, 0 = none (NoPE: SmolLM3); None: RoPE everywhere
    fused_checkpoint: tuple = ()  # projections stored fused: Phi-3 qkv_proj and gate_up_proj, GLM-4 the second
    # mixture of experts (0 experts: every MLP dense)
    num_experts: int = 0
    num_experts_per_tok: int = 2  # top-k
    moe_intermediate_size: int = 0  # each expert's width
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1 (Mixtral, Qwen3-MoE)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert every token takes, sigmoid-gated
    shared_expert_gated: bool = True  # False: the shared expert's output is added as it is (GLM-4.5)
    n_shared_experts: int = 0  # GLM-4.5: the shared expert is moe_intermediate_size * this wide
    first_k_dense_replace: int = 0  # GLM-4.5: the first k layers are dense
    router: str = "softmax"  # | "sigmoid" (GLM-4.5: kernels.group_topk of sigmoid(logits) + a correction bias; the
    n_group: int = 1  # weights are the sigmoid scores, times routed_scaling_factor) | "softmax_bias" (ERNIE 4.5:
    #                   top-k of softmax(logits) + a correction bias, the weights the softmax's) | "sigmoid_input"
    #                   (Llama 4: sigmoid of the top-k logits, scaling the experts' inputs) | "sparsemixer" (PhiMoE)
    router_jitter_noise: float = 0.01  # PhiMoE: kernels.sparsemixer's eps
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 and i not in mlp_only_layers
    mlp_only_layers: list | None = None
    moe_layer_end_index: int = -1  # ERNIE 4.5: layers after this one are dense (-1: none)
    router_aux_loss_coef: float = 0.0  # load-balancing loss weight (0: not computed, as transformers' default)
    router_bias: bool = False  # gpt-oss: the router has a bias
    expert_bias: bool = False  # gpt-oss: each expert's gate_up and down projections have biases
    swiglu_limit: float | None = None  # gpt-oss: experts' SwiGLU clamped, (clamp(u, -l, l) + 1) g' sigmoid(alpha g'),
    swiglu_alpha: float = 1.702  # g' = min(g, l)
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in every softmax's denominator
    # dropout in training (off in eval): attention probabilities, each branch before its residual add, embeddings
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    # Gemma 4: full layers' own head_dim (and kv heads, sharing k for v), v normed per head without a weight, per-layer
    # input embeddings (PLE) of this width, the last num_kv_shared_layers reusing the k/v of the last layer of their
    # type before them (MLPs twice as wide with use_double_wide_mlp), each block's output times a loaded scalar
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False  # full layers: no v_proj, v = k_proj(x) (before k's norm and RoPE)
    v_norm: bool = False
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    layer_scalar: bool = False
    moe_block: bool = False  # Gemma 4 (26B-A4B): routed experts beside every layer's dense MLP, from its input
    # Llama 4: chunked attention on layer_types "chunked_attention"; the queries of NoPE layers (of every layer:
    # Ministral 3) scaled by 1 + attn_scale * log1p(floor((position + temperature_offset) / floor_scale))
    alibi: str = ""  # no RoPE; each head's scores + slope_h * position: "mpt" (key - last key) | "falcon" (the key's
    #                 position from the row's first real token, rounded to bf16, / sqrt(head_dim))
    parallel_norms: int = 1  # Falcon-40B/180B: a parallel block with a norm for each branch (ln_attn, ln_mlp)
    qkv_grouped: bool = False  # Falcon: the fused q/k/v stored per kv group, [q_1 .. q_g, k, v] (formats.split_fused)
    attention_chunk_size: int | None = None
    attn_scale: float = 0.0
    floor_scale: float = 8192.0
    temperature_offset: int = 0
    temperature_nope_only: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sparse(self, layer: int) -> bool:
        if self.single_mixer:  # (Nemotron-H: its "moe" layers)
            return self.layer_types[layer] == "moe"
        return self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0 and layer not in (
            self.mlp_only_layers or ()) and self.first_k_dense_replace <= layer and not self.moe_block and (
            self.moe_layer_end_index < 0 or layer <= self.moe_layer_end_index)

    def has_rope(self, layer: int) -> bool:
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    def is_sliding(self, layer: int) -> bool:
        types = self.layer_types or ["sliding_attention"] * (layer + 1)
        return bool(self.sliding_window) and types[layer] == "sliding_attention"

    def is_chunked(self, layer: int) -> bool:
        types = self.layer_types or [""] * (layer + 1)
        return bool(self.attention_chunk_size) and types[layer] == "chunked_attention"

    def head_dim_at(self, layer: int) -> int:
        return self.global_head_dim if self.global_head_dim and not self.is_sliding(layer) else self.head_dim

    def kv_heads_at(self, layer: int) -> int:
        full = self.attention_k_eq_v and self.num_global_key_value_heads and not self.is_sliding(layer)
        return self.num_global_key_value_heads if full else self.num_key_value_heads

    def kv_source(self, layer: int) -> int | None:
        """Gemma 4: the earlier layer whose keys and values this one reuses, or None."""
        first = self.num_hidden_layers - self.num_kv_shared_layers
        return None if layer < first else max(i for i in range(first) if self.is_sliding(i) == self.is_sliding(layer))


# ---------------------------------------------------------------------------------------------
# The decoder
class Block(nn.Module):
    """Pre-norm (Llama):  x += attn(n1(x));          x += mlp(n2(x))
    Sandwich (Gemma 2/3): x += n2(attn(n1(x)));      x += n4(mlp(n3(x)))
    Post-norm (Olmo 2):   x += n2(attn(x));          x += n4(mlp(x))
    Parallel (Phi-2):     x += attn(n1(x)) + mlp(n1(x))
    with Hugging Face's names n1 input_layernorm, n2 post_attention_layernorm, n3 pre_feedforward_layernorm,
    n4 post_feedforward_layernorm (Llama's pre-MLP norm is also called post_attention_layernorm), and every
    branch times residual_multiplier (Granite). Gemma 4 then adds its per-layer input (ple [B, T, P]) through a
    gate, x += n5(proj(gelu(gate(x)) * ple)), and scales the block's output by a loaded layer_scalar. LFM2's
    "conv" layers (Qwen3.5's "linear_attention" layers) mix tokens by mixers.ShortConv (GatedDeltaNet)."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        wide = cfg.use_double_wide_mlp and cfg.kv_source(layer) is not None  # (Gemma 4's KV-shared layers)
        kind, self.index = (cfg.layer_types or [""] * (layer + 1))[layer], layer
        mamba = lambda: Mamba2(cfg.hidden_size, *cfg.ssm[:7], cfg.rms_norm_eps, cfg.ssm[8:])  # noqa: E731
        if cfg.single_mixer:  # Nemotron-H
            self.norm = make_norm(cfg)
            self.mixer = mamba() if kind == "linear_attention" else Attention(cfg, layer) if kind == "full_attention" \
                else MoE(cfg) if kind == "moe" else MLP(cfg)
            return
        if cfg.conv_kernel and kind == "conv":  # LFM2: a short convolution for attention
            self.conv = ShortConv(cfg.hidden_size, cfg.conv_kernel, cfg.conv_bias)
        elif kind == "linear_attention" and cfg.ssm:  # Granite 4.0-H: Mamba2
            self.mamba = mamba()
        elif kind == "linear_attention":  # Qwen3.5: Gated DeltaNet
            self.linear_attn = GatedDeltaNet(cfg.hidden_size, *cfg.linear_heads, cfg.rms_norm_eps)
        else:
            self.self_attn = (LatentAttention if cfg.latent else Attention)(cfg, layer)
        if cfg.shared_mlp:  # Granite 4.0-H: beside the experts, or the layer's only MLP
            self.shared_mlp = MLP(cfg, cfg.shared_mlp)
        if cfg.is_sparse(layer) or not cfg.shared_mlp:
            self.mlp = MoE(cfg) if cfg.is_sparse(layer) else MLP(cfg, 2 * cfg.intermediate_size if wide else None)
        if P := cfg.hidden_size_per_layer_input:
            self.per_layer_input_gate = nn.Linear(cfg.hidden_size, P, bias=False)
            self.per_layer_projection = nn.Linear(P, cfg.hidden_size, bias=False)
            self.post_per_layer_input_norm = make_norm(cfg)
        if cfg.moe_block:  # Gemma 4: a router (its input normed without weight, scaled; a scale per expert) and
            self.router, self.experts = nn.Module(), Experts(cfg)  # experts on their own norms (_1, _2)
            self.router.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
            self.router.scale = nn.Parameter(torch.ones(cfg.hidden_size))
            self.router.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
            for n in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
                setattr(self, n, make_norm(cfg))
            self.k, self.eps = cfg.num_experts_per_tok, cfg.rms_norm_eps
        if cfg.layer_scalar:  # (a loaded constant, not trained: transformers keeps it as a buffer)
            self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        self.pre, self.post, self.parallel = cfg.pre_norm, cfg.post_norm, cfg.parallel_block
        if cfg.parallel_norms == 2:  # Falcon's new decoder: attention and MLP each from their own norm
            self.ln_attn, self.ln_mlp = make_norm(cfg), make_norm(cfg)
        elif self.pre or self.parallel:
            self.input_layernorm = make_norm(cfg)
        if self.post:
            self.post_attention_layernorm, self.post_feedforward_layernorm = make_norm(cfg), make_norm(cfg)
        if self.pre and not self.parallel:
            setattr(self, "pre_feedforward_layernorm" if self.post else "post_attention_layernorm", make_norm(cfg))
        self.mult = cfg.residual_multiplier
        self.drop = nn.Dropout(cfg.residual_dropout) if cfg.residual_dropout else None  # (no module call when 0)

    @property
    def attention(self):
        """The layer's softmax attention, or None (a token mixer of mixers.py; Nemotron-H's MLP layers)."""
        a = getattr(self, "self_attn", None) or getattr(self, "mixer", None)
        return a if isinstance(a, (Attention, LatentAttention)) else None

    def forward(self, x, cos, sin, mask, cache=None, ple=None, kv=None, k=None, v=None, qscale=None):
        """kv, k, v: Gemma 4's stored keys and values (a dict) and the ones this layer reuses (tensors: a checkpointed
        block's backward reaches the layer that made them); qscale: the queries' temperature (Attention.forward)."""
        if hasattr(self, "mixer"):  # Nemotron-H
            h, m = self.norm(x), self.mixer
            return x + (m(h, cos, sin, mask, cache) if isinstance(m, Attention) else m(
                h, *mask, state=cache and cache.states[self.index]) if isinstance(m, Mamba2) else m(h, residual=True))
        if self.parallel:
            h = self.ln_attn(x) if hasattr(self, "ln_attn") else self.input_layernorm(x)
            a, y = self.self_attn(h, cos, sin, mask, cache), self.mlp(
                self.ln_mlp(x) if hasattr(self, "ln_mlp") else h, residual=True)
            if self.drop:
                a, y = self.drop(a), self.drop(y)
            return x + a + y
        h = self.input_layernorm(x) if self.pre else x
        mixer = getattr(self, "conv", None) or getattr(self, "linear_attn", None) or getattr(self, "mamba", None)
        a = mixer(h, *mask, state=cache and cache.states[self.index]) if mixer else self.self_attn(
            h, cos, sin, mask, cache, kv if k is None else {self.self_attn.sliding: (k, v)}, qscale)
        if self.post:
            a = self.post_attention_layernorm(a)
        a = self.drop(a) if self.drop else a
        x = x + (a * self.mult if self.mult != 1 else a)
        z = (self.pre_feedforward_layernorm if self.post else self.post_attention_layernorm)(x) if self.pre else x
        skip = not self.post and self.mult == 1
        y = self.mlp(z, residual=skip) if hasattr(self, "mlp") else 0
        y = y + self.shared_mlp(z, residual=skip) if hasattr(self, "shared_mlp") else y
        if hasattr(self, "experts"):
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(self.routed(x))
        if self.post:
            y = self.post_feedforward_layernorm(y)
        y = self.drop(y) if self.drop else y
        x = x + (y * self.mult if self.mult != 1 else y)
        if ple is not None:
            g = self.per_layer_projection(F.gelu(self.per_layer_input_gate(x), approximate="tanh") * ple)
            x = x + self.post_per_layer_input_norm(g)
        return x * self.layer_scalar if hasattr(self, "layer_scalar") else x

    def routed(self, r):
        """Gemma 4's experts on the block's MLP input r [B, T, C] (renormalised top-k of a softmax, times each
        chosen expert's scale)."""
        B, T, C = r.shape
        h = r.reshape(-1, C)
        z = F.rms_norm(h, (C,), eps=self.eps) * self.router.scale * C**-0.5
        w, idx = kernels.route(F.softmax(self.router.proj(z).float(), dim=-1), self.k)
        w = w * self.router.per_expert_scale[idx]
        return self.experts(self.pre_feedforward_layernorm_2(h), idx, w.to(h.dtype)).view(B, T, C)


class Decoder(nn.Module):
    """The body ("model." in Hugging Face names): embeddings, blocks, final norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg)
        if P := cfg.hidden_size_per_layer_input:  # Gemma 4: each layer's own input, from the token and from x
            LP = cfg.num_hidden_layers * P
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, LP)
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, LP, bias=False)
            self.per_layer_projection_norm = make_norm(cfg, P)

    def per_layer_inputs(self, ids, x, c: Config):
        """Gemma 4: ids [B, T], the scaled embeddings x -> [B, T, L, P], one input per layer."""
        B, T, P = *ids.shape, c.hidden_size_per_layer_input
        tok = self.embed_tokens_per_layer(ids) * torch.tensor(P**0.5, dtype=x.dtype)
        ctx = (self.per_layer_model_projection(x) * c.hidden_size**-0.5).view(B, T, -1, P)
        ctx = self.per_layer_projection_norm(ctx)
        return (ctx + tok.view(B, T, -1, P)) * 2**-0.5


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config, self.model = cfg, Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.tie_weights()
        for name, (*_, dim) in self.rope_buffers().items():  # inverse frequencies, filled by reset_rope (not in
            self.register_buffer(name, torch.empty(dim // 2), persistent=False)  # checkpoints)
        self.reset_rope()
        self.block_memory = None  # set by memory.checkpoint_blocks: in training, blocks recomputed in backward
        self.varlen = False  # packed rows on a GPU: flash varlen attention instead of a block-diagonal mask

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope_buffers(self) -> dict:
        """buffer name -> (theta, scaling, long, rotated dims): the global rotation; LongRoPE's long one; Gemma 3's
        local one (Gemma 4's full layers rotate their own, wider heads)."""
        c = self.config
        full = c.latent[2] if c.latent else int((c.global_head_dim or c.head_dim) * c.partial_rotary_factor)
        out = {"inv_freq": (c.rope_theta, c.rope_scaling, False, full)}
        if (c.rope_scaling or {}).get("rope_type") == "longrope" and "long_mscale" not in c.rope_scaling:
            out["inv_freq_long"] = (c.rope_theta, c.rope_scaling, True, full)  # (PhiMoE: short factors always)
        if c.local_rope_theta:
            out["inv_freq_local"] = (c.local_rope_theta, None, False, c.rotary_dim)
        return out

    def reset_rope(self, device=None):
        for name, (theta, scaling, long, dim) in self.rope_buffers().items():
            if (buf := getattr(self, name)).is_meta or device is not None:
                setattr(self, name, buf := torch.empty(dim // 2, device=device))
            with torch.no_grad():
                buf.copy_(rope_inv_freq(dim, theta, scaling, long))
        self.rope_factor = rope_attention_factor(self.config.rope_scaling)

    def rope_tables(self, position_ids, S=None):
        """{sliding?: (cos, sin)}: one table for every layer, or Gemma 3's global and local ones. S: the
        sequence length when known on the host (packed rows: the longest document, found on the device)."""
        c, s = self.config, self.config.rope_scaling or {}
        inv, factor = self.inv_freq, self.rope_factor
        if s.get("rope_type") == "longrope":  # LongRoPE: long factors once the sequence passes the old context
            long = (S or int(position_ids.max()) + 1) > s["original_max_position_embeddings"]
            inv = self.inv_freq_long if long and hasattr(self, "inv_freq_long") else inv
            factor = s["long_mscale" if long else "short_mscale"] if "long_mscale" in s else factor  # (PhiMoE's)
        full = rotary(position_ids, inv, factor)
        return {False: full, True: rotary(position_ids, self.inv_freq_local) if c.local_rope_theta else full}

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """input_ids [B, T] -> final hidden states [B, T, C]. attention_mask [B, S] (1 = real token, 0 = padding;
        S = cached + T) hides padded keys. position_ids [B, T] marks *packed* rows: each position 0 starts a new
        document and no token attends across documents (the SFT packer passes them). cache: a KVCache."""
        (B, T), packed, static = input_ids.shape, position_ids is not None, cache is not None and cache.at is not None
        offset = cache.at if static else cache.pos if cache is not None else 0  # (static: a tensor, see KVCache)
        S = cache.span if static else offset + T  # the keys seen
        if position_ids is None:
            position_ids = (offset + torch.arange(T, device=input_ids.device)).expand(B, T)
        c = self.config
        x = self.model.embed_tokens(input_ids)
        if c.embed_scale:  # Gemma: sqrt(hidden) rounded to the activation dtype, as the reference does
            x = x * torch.tensor(c.hidden_size**0.5, dtype=x.dtype)
        x = x * c.embedding_multiplier if c.embedding_multiplier != 1 else x  # Granite
        x = F.dropout(x, c.embedding_dropout) if c.embedding_dropout and self.training else x
        ple = self.model.per_layer_inputs(input_ids, x, c) if c.hidden_size_per_layer_input else None
        rope = self.rope_tables(position_ids, None if packed else S)
        need = attention_mask is not None or packed or (T > 1 and offset > 0) or c.alibi
        attn = [layer.attention for layer in self.model.layers]  # (None: LFM2's convolutions, Mamba2, ..)
        masks, windows = {}, {c.sliding_window if a.sliding else None for a in attn if a is not None}
        plain, C = attention_mask is None and cache is None and not c.alibi, c.attention_chunk_size  # whole rows
        if self.varlen and packed and plain and kernels.varlen_usable(x, c, windows):
            masks = kernels.packed_rows(position_ids, windows)  # no [B, 1, T, T] mask: varlen flash attention
        elif not packed and plain and any(w and S > w for w in windows) and kernels.varlen_usable(x, c, windows):
            masks = kernels.whole_rows(B, T, windows, x.device)  # a sliding window through flash varlen, no mask
        if C and plain and (self.varlen if packed else S > C) and kernels.varlen_usable(x, c, windows):
            masks.update(kernels.packed_rows(position_ids, (), C))  # (Llama 4: each chunk a varlen document)
        docs = position_ids.eq(0).cumsum(1) if packed else None  # [B, T] document index per token
        for w in windows - set(masks):
            if need or (w and S > w):
                masks[w] = attention_mask_for(B, T, offset, attention_mask, docs, w, x.device, S=S)
        if c.alibi:  # (a float mask: -inf where masked, the heads' position bias elsewhere)
            masks[None] = alibi_bias(c, B, S, attention_mask, position_ids if packed else None, x).masked_fill(
                ~masks[None], float("-inf"))
        if C and (need or S > C) and "chunk" not in masks:  # Llama 4's chunked layers
            masks["chunk"] = attention_mask_for(B, T, offset, attention_mask, docs, None, x.device, C,
                                                position_ids if packed else None, S)
        qscale = None
        if c.attn_scale:  # the queries' temperature, by position (a packed document's own: packed = separate)
            pos = position_ids.float() + c.temperature_offset
            qscale = (1 + c.attn_scale * torch.log1p(torch.floor(pos / c.floor_scale)))[:, None, :, None].to(x.dtype)
        ckpt = None
        if self.block_memory is not None and self.training and torch.is_grad_enabled():
            dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.model.layers.modules())
            ckpt = self.block_memory.begin(x.device, rng=dropout)  # one forward pass of checkpointed blocks
        last, kv = self.model.layers[-1], {} if c.num_kv_shared_layers else None
        stores = {c.kv_source(i) for i in range(c.num_hidden_layers)} - {None}
        convs = (attention_mask[:, offset:S] if attention_mask is not None and None in attn else None, docs)  # (for
        #        the layers without attention: LFM2's convolutions, the SSMs)
        for i, (layer, a) in enumerate(zip(self.model.layers, attn)):
            mask = convs if a is None else masks.get("chunk" if a.chunked else c.sliding_window if a.sliding else None)
            cos, sin = rope[bool(a and a.sliding)]
            k, v = (None, None) if c.kv_source(i) is None else kv[a.sliding]  # (Gemma 4's reused keys and values)
            args = (None if ple is None else ple[:, :, i], k, v, qscale if a and a.temperature else None)
            if ckpt and i not in stores:  # keep only the block input (on the host with offload); recompute the
                x = ckpt.block(layer, x, cos, sin, mask, None, args[0], None, *args[1:], last=layer is last)
            else:  # (a store layer keeps its graph: the layers reusing its k, v send their gradients into it)
                x = layer(ckpt.close(x) if ckpt else x, cos, sin, mask, cache, args[0], kv, *args[1:])
        if cache is not None and not static:
            cache.pos += T
        if ckpt:
            x = ckpt.end(x)
        h = self.model.norm(x)
        h = h * c.logit_scale if c.logit_scale != 1 else h  # Cohere: logits * s, Granite: logits / s (the head
        return h / c.logits_scaling if c.logits_scaling != 1 else h  # has no bias: its input carries s)

    def router_aux(self):
        """(the last forward's load-balancing loss, a constant; scale) or None: scale(s) makes the coming backward add
        s * its gradient to every router's probabilities (exact under block checkpointing: the recompute reads it).
        d aux / d p[n, e] = E f_e / R, R = rows x layers."""
        moes = [m for m in self.modules() if isinstance(m, MoE) and m.router_stats is not None]
        if not moes:
            return None
        stats, E = [m.router_stats for m in moes], self.config.num_experts
        value, rows = kernels.moe_aux_loss(stats, E), sum(r for _, _, r in stats)
        f = sum(c for c, _, _ in stats) / rows
        def scale(s):  # (None: add nothing)
            for m in moes:
                m.aux_grad["grad"] = None if s is None else (s * E / rows) * f
        return value, scale

    def run(self, fn, *args, **kwargs):
        """fn(self, *args) inside this module's forward: dist.py registers `run` as an FSDP forward method (lm_head is
        gathered while a loss that owns the head uses it); fn calls model.forward."""
        return fn(self, *args, **kwargs)

    def logits(self, h):
        """[..., C] hidden states -> [..., V] logits (with Gemma 2's final softcap). Granite's logits_scaling
        is already in h (forward divides the hidden states), so a fused loss over lm_head sees it too."""
        return kernels.softcap(self.lm_head(h), self.config.final_logit_softcapping)


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
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # keep the smallest prefix whose mass reaches p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def static_decoding(model):
    """Why the decode step of `model` cannot run static (at a position tensor, captured as a CUDA graph), or None.
    (A sharded model under torchrun cannot either: its forward is collective; the caller knows that.)"""
    c = model.config
    if any(layer.attention is None for layer in model.model.layers):
        return "its convolution / SSM / linear-attention layers replace their recurrent states each step"
    if c.alibi or (c.rope_scaling or {}).get("rope_type") == "longrope":
        return "its position terms (ALiBi slopes, LongRoPE's factors) are chosen on the host each step"
    if model.training:
        return "it is in training mode (a captured dropout mask would repeat every step): call model.eval()"
    w = model.lm_head.weight  # (the activations' device and dtype)
    if c.num_experts and w.is_cuda and (w.dtype != torch.bfloat16 or kernels._grouped_mm_fn() is None):
        return "its experts take the reference loop here (not bf16, or no grouped_mm), which waits on the host"
    return None


class Decoding:
    """B rows over one preallocated KV cache [B, max_len] (generate, GRPO's rollouts): the prompts' prefill, then a
    token per row a step. static: a step writes at a 0-dim position tensor and reads the cache up to its `bucket`'s
    end (256 keys; the mask hides the rest) from fixed buffers: on CUDA each bucket's step is captured once as a CUDA
    graph and replayed; elsewhere it runs eagerly. Not static, a step passes the mask only for padded prompts."""

    def __init__(self, model, B, max_len, static, bucket=256):
        self.model, self.static, self.max_len, self.bucket = model, static, max_len, bucket
        if static and any(layer.attention is None for layer in model.model.layers):  # (graphs=True asked of it)
            raise ValueError(f"this model's decode step cannot run static: {static_decoding(model)}; pass graphs=None")
        dev = model.inv_freq.device
        self.cache = KVCache(model.config, B, max_len, dev, model.lm_head.weight.dtype)
        self.mask = torch.zeros(B, max_len, dtype=torch.long, device=dev)  # [B, max_len] 1 = a real token
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)  # the step's input
        self.capture, self.graphs, self.pool = static and dev.type == "cuda", {}, None
        self.failed = None  # why a capture failed (the steps then run static but eagerly)

    def prefill(self, ids, mask=None, rows=None):
        """Prompts [B, L] (left-padded, mask [B, L]; None: none padded, and no row will stop while another goes on)
        -> the last position's logits [B, V]. rows: that many per forward (a lower peak) where no layer is recurrent."""
        (B, self.pos), self.padded = ids.shape, mask is not None
        self.mask[:, : self.pos] = 1 if mask is None else mask
        n = rows if rows and all(layer.attention is not None for layer in self.model.model.layers) else B
        h = [self.model(ids[r : r + n], attention_mask=None if mask is None else mask[r : r + n],
                        cache=self.cache.rows(r, r + n) if n < B else self.cache)[:, -1] for r in range(0, B, n)]
        self.cache.pos = self.pos
        return self.model.logits(torch.cat(h))

    def step(self, tok, live):
        """The next token of every row [B] (live: the rows it is real in) -> the logits after it [B, V]."""
        p, self.pos = self.pos, self.pos + 1
        self.mask[:, p] = live
        if not self.static:
            return self.model.logits(self.model(tok[:, None], attention_mask=self.mask[:, : p + 1] if self.padded
                                                else None, cache=self.cache)[:, -1])
        self.tok.copy_(tok[:, None])
        if self.cache.at is None:
            self.cache.at = torch.zeros((), dtype=torch.long, device=tok.device)
        self.cache.at.fill_(p)
        span = min(self.max_len, (p // self.bucket + 1) * self.bucket)
        if not self.capture:
            return self.run(span)
        if span not in self.graphs:
            try:
                self.graphs[span] = self.captured(span)
            except RuntimeError as e:  # (a capture CUDA refuses: the same step, eagerly, and the reason kept)
                self.capture, self.failed = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                print(f"warning: the decode step was not captured as a CUDA graph ({self.failed}); it runs eagerly",
                      flush=True)
                return self.run(span)
        graph, out = self.graphs[span]
        graph.replay()
        return out

    def run(self, span):
        self.cache.span = span
        return self.model.logits(self.model(self.tok, attention_mask=self.mask[:, :span], cache=self.cache)[:, -1])

    def captured(self, span):
        """(a CUDA graph of run(span), its output buffer) after a warm-up on a side stream (Triton compiles, cuBLAS
        workspaces; host syncs made errors: what a capture refuses fails there). The buckets share one memory pool."""
        side, stream, mode = torch.cuda.Stream(), torch.cuda.current_stream(), torch.cuda.get_sync_debug_mode()
        side.wait_stream(stream)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):
                self.run(span)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        stream.wait_stream(side)
        graph, self.pool = torch.cuda.CUDAGraph(), self.pool or torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.run(span)
        except RuntimeError:  # (ending a failed capture, torch raises before it restores the stream and takes the
            torch.cuda.set_stream(stream)  # RNG out of capture: later random ops would fail; both put back)
            rng = torch.cuda.default_generators[stream.device.index]
            rng.graphsafe_set_state(rng.clone_state())
            raise
        return graph, out


@torch.no_grad()
def generate(model: Transformer, prompt_ids, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
             stop_ids=(), use_cache=True, seed=None, on_token=None, graphs=False) -> list:
    """New token ids after `prompt_ids` (stop token included when hit). use_cache=False recomputes the
    whole sequence every step (the reference the KV cache is tested against). graphs: decode static (Decoding: on
    CUDA replayed as CUDA graphs); None: on CUDA where static_decoding allows (not for a sharded model)."""
    device = model.inv_freq.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if graphs is None:
        graphs = device.type == "cuda" and static_decoding(model) is None
    ids, out = list(prompt_ids), []
    dec = Decoding(model, 1, len(ids) + max_new_tokens, graphs) if use_cache and max_new_tokens > 0 else None
    logits = dec.prefill(torch.tensor([ids], device=device))[0] if dec else None
    for i in range(max_new_tokens):
        if not dec:
            logits = model.logits(model(torch.tensor([ids], device=device))[0, -1])
        nxt = sample(logits.float(), temperature, top_k, top_p, gen)
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if nxt in stop_ids:
            break
        ids.append(nxt)
        if dec and i + 1 < max_new_tokens:
            logits = dec.step(torch.tensor([nxt], device=device), torch.ones(1, dtype=torch.bool, device=device))[0]
    return out
