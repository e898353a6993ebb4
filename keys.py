"""nanotune config keys: which config.json keys change the math (MATH_KEYS, with the values at which they change
nothing), which never do (INERT), which config_from_hf reads for every family (READ), and the checks families.py
runs on each config.json: a math key a family does not implement is refused in one sentence, a key in no list is
named in one warning line; and the layouts where a family's own keys decide Config fields (Falcon's flags, LFM2's,
Qwen3.5's and DeepSeek-V3's attention shapes), each a reader (config.json -> fields) and a writer (Config ->
config.json). `fam` is a families.Family row and `c` a model.Config (read by attribute only: this file imports
nothing of nanotune but the error type)."""
import math

from cli import NanotuneError


# config.json keys that change the math when set, each with the value (or values) at which it changes nothing.
# A family that does not read such a key refuses a config that sets it otherwise, rather than building another
# model than the checkpoint's (an Olmo 3 config relabelled olmo2 would lose its sliding window).
MATH_KEYS = {"sliding_window": (None,), "attn_logit_softcapping": (None,), "final_logit_softcapping": (None,),
             "query_pre_attn_scalar": (None,), "logits_scaling": (None, 1, 1.0), "embedding_multiplier": (None, 1, 1.0),
             "residual_multiplier": (None, 1, 1.0), "attention_multiplier": (None,), "swiglu_limit": (None,),
             "use_qk_norm": (None, False), "attention_chunk_size": (None,), "no_rope_layers": (None, []),
             "rope_local_base_freq": (None,), "clip_qkv": (None,), "routed_scaling_factor": (None, 1, 1.0),
             "n_group": (None, 1), "topk_group": (None, 1), "first_k_dense_replace": (None, 0),
             "moe_norm_min": (None, 1e-12), "enable_moe_block": (None, False),
             "use_bidirectional_attention": (None, False, "vision"), "num_kv_shared_layers": (None, 0),
             "hidden_size_per_layer_input": (None, 0), "attention_k_eq_v": (None, False),
             "resid_pdrop": (None, 0, 0.0), "embd_pdrop": (None, 0, 0.0), "emb_pdrop": (None, 0, 0.0),
             "router_jitter_noise": (None, 0, 0.0), "input_jitter_noise": (None, 0, 0.0)}


# The other config.json keys, so that none is ignored unknowingly: bookkeeping, the tokenizer's ids, generation and
# runtime switches (INERT), and what config_from_hf reads for every family (READ). A key in none of these, in no
# family's lists and not in MATH_KEYS gets one warning line at load (tests: every key of transformers' own config
# class for each family is in one of them).
INERT = {"_name_or_path", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "use_cache",
         "initializer_range", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
         "problem_type", "is_encoder_decoder", "chunk_size_feed_forward", "tokenizer_class", "quantization_config",
         "use_bfloat16", "tie_encoder_decoder", "is_decoder", "add_cross_attention", "sep_token_id",
         "decoder_start_token_id", "eod_token_id", "task_specific_params", "finetuning_task", "prefix", "max_length",
         "transformers.js_config", "is_llama_config", "_sliding_window_pattern",  # (Gemma 3's private copy)
         "cache_implementation", "unsloth_version", "unsloth_fixed",
         "pretraining_tp",  # (Llama: transformers >= 4.4x ignores it; before, the same product in slices)
         "rope_interleaved"}  # (nanotron's configs: transformers' Llama ignores it, as nanotune does)
READ = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "partial_rotary_factor", "max_position_embeddings", "original_max_position_embeddings", "tie_word_embeddings",
        "hidden_act", "hidden_activation", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
        "attention_bias", "attention_dropout", "layer_types", "qk_layernorm", "text_config"}


def unknown_keys(d: dict, fam) -> list:
    """config.json keys (set, not null) that no list above accounts for: nanotune cannot tell what they do."""
    known = INERT | READ | set(MATH_KEYS) | reads(fam) | set(fam.keys.values()) | set(fam.requires) | set(
        fam.aliases) | set(fam.reads) | set(fam.inert) | {fam.nested} | ({"no_rope_layer_interval"} if (
            "no_rope_layers" in fam.hf_keys) else set())
    if "num_experts" in fam.hf_keys:
        known |= {"num_local_experts", "num_experts", "router_aux_loss_coef", "output_router_logits"}
    if fam.sliding:
        known |= {"use_sliding_window", "sliding_window_pattern", "max_window_layers"}
    return sorted(k for k, v in d.items() if k not in known and v is not None)


def reads(fam) -> set:
    """The MATH_KEYS a family implements."""
    keys = set(fam.hf_keys) | {fam.keys.get(k, k) for k in fam.hf_keys} | set(fam.flags)
    if fam.sliding:
        keys.add("sliding_window")
    if fam.layer_types == "pattern":  # (Gemma 3's local rope base comes with its sliding layers)
        keys.add("rope_local_base_freq")
    return keys


def check_unread_keys(d: dict, fam, mt: str, where: str):
    head_dim = d.get("head_dim") or d.get("hidden_size", 0) // max(d.get("num_attention_heads") or 1, 1)
    for k, neutral in MATH_KEYS.items():
        neutral = (*neutral, head_dim) if k == "query_pre_attn_scalar" else neutral  # (1/sqrt(head_dim) as usual)
        if k in d and d[k] not in neutral and k not in reads(fam):
            raise NanotuneError(f"{where}: {k}={d[k]!r} would change the model, and nanotune's {mt} does not implement "
                                "it; this checkpoint is probably another family relabelled: use its own model_type.")
    types = set(d.get("layer_types") or ()) - ({"chunked_attention"} if "attention_chunk_size" in reads(fam) else set(
    )) - ({"conv"} if "conv_L_cache" in fam.reads else set()) - (
        {"linear_attention"} if {"linear_num_key_heads", "mamba_n_heads"} & set(fam.reads) else set())
    if types - {"full_attention", "sliding_attention"} or ("sliding_attention" in types and not fam.sliding):
        raise NanotuneError(f"{where}: layer_types holds {sorted(types)}; nanotune's {mt} runs "
                            f"{'full and sliding' if fam.sliding else 'only full'} attention layers.")


# ---------------------------------------------------------------------------------------------
# Layouts: a family's own config.json keys <-> Config fields (Family.layout)
def falcon_in(d: dict, where: str) -> dict:
    """Falcon's flags -> the common keys (kv heads, MLP width) and the Config fields of its block layout."""
    H, new, parallel = d["num_attention_heads"], d.get("new_decoder_architecture"), d.get("parallel_attn", True)
    norms = d.get("num_ln_in_parallel_attn") or (2 if new else 1)
    if (new and not parallel) or (not new and norms == 2) or d.get("attention_dropout"):
        raise NanotuneError(f"{where}: this Falcon layout (new_decoder_architecture={bool(new)}, parallel_attn="
                            f"{parallel}, num_ln_in_parallel_attn={norms}, attention_dropout="
                            f"{d.get('attention_dropout')}) is not one transformers runs either; check the file.")
    d.update(num_key_value_heads=(d.get("num_kv_heads") or H) if new else 1 if d.get("multi_query", True) else H,
             intermediate_size=d.get("ffn_hidden_size") or 4 * d["hidden_size"], attention_bias=bool(d.get("bias")),
             mlp_bias=bool(d.get("bias")))
    return dict(parallel_block=bool(parallel), parallel_norms=norms if parallel else 1, alibi="falcon" * bool(
        d.get("alibi")), residual_dropout=float(d.get("hidden_dropout") or 0.0))


def falcon_out(c, d: dict):
    """The inverse of falcon_in, into a config.json transformers reads back."""
    new = c.parallel_norms == 2 or 1 < c.num_key_value_heads < c.num_attention_heads
    d.update(new_decoder_architecture=new, multi_query=c.num_key_value_heads == 1, num_kv_heads=c.num_key_value_heads,
             parallel_attn=c.parallel_block, num_ln_in_parallel_attn=c.parallel_norms if new else None,
             alibi=c.alibi == "falcon", bias=c.qkv_bias, ffn_hidden_size=c.intermediate_size, activation="gelu",
             hidden_dropout=c.residual_dropout)
    d.pop("head_dim")  # (a read-only property of FalconConfig)


def lfm2_in(d: dict, where: str) -> dict:
    """LFM2: the MLP width as Lfm2MLP derives it from the block_* keys; "conv" layers where full_attn_idxs
    lists no attention."""
    I, L = d.get("intermediate_size"), d.get("num_hidden_layers") or 0
    if d.get("block_auto_adjust_ff_dim") and isinstance(I, int):
        I = int(2 * I / 3)
        if (m := d.get("block_ffn_dim_multiplier")) is not None:
            k = d.get("block_multiple_of", 256)
            I = k * ((int(m * I) + k - 1) // k)
    full = set(d.get("full_attn_idxs") or range(L))
    d.update(intermediate_size=I, layer_types=d.get("layer_types") or [
        "full_attention" if i in full else "conv" for i in range(L)])
    return dict(conv_kernel=d.get("conv_L_cache", 3), conv_bias=bool(d.get("conv_bias")), layer_types=d["layer_types"])


def lfm2_out(c, d: dict):
    d.update(intermediate_size=c.intermediate_size, block_auto_adjust_ff_dim=False, conv_L_cache=c.conv_kernel,
             conv_bias=c.conv_bias, layer_types=c.layer_types,
             full_attn_idxs=[i for i, t in enumerate(c.layer_types) if t != "conv"])


def qwen35_in(d: dict, where: str) -> dict:
    """Qwen3.5: Gated DeltaNet on "linear_attention" layers (three of every full_attention_interval by default)."""
    L, every = d.get("num_hidden_layers") or 0, d.get("full_attention_interval", 4)
    d["layer_types"] = d.get("layer_types") or ["linear_attention" if (i + 1) % every else "full_attention"
                                                for i in range(L)]
    heads = tuple(d.get(k) for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                     "linear_value_head_dim", "linear_conv_kernel_dim"))
    if not all(isinstance(h, int) and h > 0 for h in heads) or heads[1] % heads[0]:
        raise NanotuneError(f"{where}: the linear_* head counts and sizes {heads} must be whole numbers > 0, the value "
                            "heads a multiple of the key heads; the file is incomplete or not a Qwen3.5 config.")
    return dict(linear_heads=heads, layer_types=d["layer_types"])


def qwen35_out(c, d: dict):
    d.update(zip(("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                  "linear_conv_kernel_dim"), c.linear_heads), layer_types=c.layer_types)


GRANITE_SSM = ("mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_conv_bias",
               "mamba_proj_bias", "mamba_chunk_size", "time_step_limit", "mamba_expand", "shared_intermediate_size",
               "position_embedding_type", "layers_block_type")
LEGACY_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}  # (transformers' remap_legacy_layer_types)


def granite_hybrid_in(d: dict, where: str) -> dict:
    """Granite 4.0-H: Mamba2 on "linear_attention" layers (head dim "auto": expand * hidden / heads), attention
    without RoPE unless position_embedding_type is "rope", a shared MLP beside the experts."""
    L, H = d.get("num_hidden_layers") or 0, d.get("hidden_size") or 0
    types = [LEGACY_TYPES.get(t, t) for t in d.get("layer_types") or d.get("layers_block_type") or
             ["linear_attention"] * L]
    nh, expand, P = d.get("mamba_n_heads"), d.get("mamba_expand"), d.get("mamba_d_head")
    P = expand * H // nh if P == "auto" and isinstance(nh, int) and nh > 0 and isinstance(expand, int) else P
    shape = (nh, P, *(d.get(k) for k in ("mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_chunk_size")))
    if not all(isinstance(v, int) and v > 0 for v in shape) or nh % shape[2] or nh * P != expand * H:
        raise NanotuneError(f"{where}: the mamba_* sizes (heads, head dim, groups, state, conv, chunk) {shape} must "
                            "be whole numbers > 0, the heads a multiple of the groups and heads x head dim = "
                            "mamba_expand x hidden_size; the file is incomplete or not a Granite 4.0-H config.")
    lo, hi = (float(v["__float__"]) if isinstance(v, dict) else v  # (transformers saves inf as {"__float__": ..})
              for v in d.get("time_step_limit") or (0.0, float("inf")))
    if d.get("position_embedding_type") not in (None, "rope"):
        raise NanotuneError(f"{where}: position_embedding_type={d['position_embedding_type']!r} is not one Granite "
                            "4.0-H has; it is null (no positions) or \"rope\".")
    d["layer_types"] = types
    fields = dict(ssm=(*shape[:5], bool(d.get("mamba_conv_bias")), bool(d.get("mamba_proj_bias")), shape[5],
                       float(lo), float(hi)), shared_mlp=d.get("shared_intermediate_size"), layer_types=types)
    if d.get("position_embedding_type") != "rope":
        fields["no_rope_layers"] = [0] * L
    return fields


def granite_hybrid_out(c, d: dict):
    nh, P, G, N, K, conv_bias, bias, chunk, lo, hi = c.ssm
    d.update(mamba_n_heads=nh, mamba_d_head=P, mamba_n_groups=G, mamba_d_state=N, mamba_d_conv=K,
             mamba_conv_bias=conv_bias, mamba_proj_bias=bias, mamba_chunk_size=chunk, time_step_limit=[lo, hi],
             mamba_expand=nh * P // c.hidden_size, shared_intermediate_size=c.shared_mlp, layer_types=c.layer_types,
             position_embedding_type="rope" if c.no_rope_layers is None or any(c.no_rope_layers) else None)
    d.pop("no_rope_layers", None)


NEMOTRON_SSM = ("layers_block_type", "hybrid_override_pattern", "mamba_num_heads", "mamba_head_dim", "n_groups",
                "ssm_state_size", "conv_kernel", "use_conv_bias", "use_bias", "chunk_size", "time_step_limit",
                "mamba_n_groups", "mamba_d_conv", "mamba_conv_bias", "mamba_chunk_size", "mamba_dt_limit")
PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}  # (Nemotron-H's legacy pattern)


def nemotron_in(d: dict, where: str) -> dict:
    """Nemotron-H: one mixer per layer by layers_block_type (or the legacy hybrid_override_pattern): Mamba2, attention
    without RoPE, a plain relu^2 MLP or MoE (Nemotron 3: DeepSeek-V3's router, plain relu^2 experts, optionally in a
    latent width, and a shared expert); the layer count is the list's length. Older names of the Mamba2 keys too."""
    types = d.get("layers_block_type") or d.get("layer_types") or [PATTERN.get(ch, ch) for ch in d.get(
        "hybrid_override_pattern") or "ME*-"]  # (NemotronHConfig's default)
    types = [LEGACY_TYPES.get(t, t) for t in types]
    if set(types) - {"linear_attention", "full_attention", "mlp", "moe"}:
        raise NanotuneError(f"{where}: layers_block_type holds {sorted(set(types))}; Nemotron-H layers are "
                            "linear_attention (Mamba2), full_attention, mlp or moe.")
    if "moe" not in types:  # (the MoE keys' defaults stay in every config.json: no experts without moe layers)
        d["n_routed_experts"] = 0
    get = lambda k, old, default=None: d.get(k, d.get(old, default))  # noqa: E731  (the newer name first)
    shape = (d.get("mamba_num_heads"), d.get("mamba_head_dim"), get("n_groups", "mamba_n_groups"),
             d.get("ssm_state_size"), get("conv_kernel", "mamba_d_conv"), get("chunk_size", "mamba_chunk_size"))
    if not all(isinstance(v, int) and v > 0 for v in shape) or shape[0] % shape[2]:
        raise NanotuneError(f"{where}: the Mamba2 sizes (mamba_num_heads, mamba_head_dim, n_groups, ssm_state_size, "
                            f"conv_kernel, chunk_size) {shape} must be whole numbers > 0, the heads a multiple of the "
                            "groups; the file is incomplete or not a Nemotron-H config.")
    d.update(layer_types=types, num_hidden_layers=len(types), attention_bias=False)  # (its attention has no biases)
    # the time step's clamp: time_step_limit, as transformers >= 5.25 computes it (5.24 clamped at time_step_min)
    lo, hi = (float(v["__float__"]) if isinstance(v, dict) else float(v)
              for v in get("time_step_limit", "mamba_dt_limit") or (0.0, float("inf")))
    return dict(ssm=(*shape[:5], bool(get("use_conv_bias", "mamba_conv_bias", True)), bool(d.get("use_bias")),
                     shape[5], lo, hi), layer_types=types, no_rope_layers=[0] * len(types))


def nemotron_out(c, d: dict):
    nh, P, G, N, K, conv_bias, bias, chunk, lo, hi = c.ssm
    d.update(layers_block_type=c.layer_types, mamba_num_heads=nh, mamba_head_dim=P, n_groups=G, ssm_state_size=N,
             conv_kernel=K, use_conv_bias=conv_bias, use_bias=bias, chunk_size=chunk, time_step_limit=[lo, hi],
             mlp_hidden_act=c.hidden_act, moe_latent_size=c.moe_latent_size or None)
    for k in ("no_rope_layers", "layer_types", "num_hidden_layers", "hidden_act", "rope_scaling", "rope_parameters",
              "rope_theta", "partial_rotary_factor"):  # (no positions at all)
        d.pop(k, None)


MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def mla_in(d: dict, where: str) -> dict:
    """DeepSeek-V3's multi-head latent attention: q and k heads of qk_nope + qk_rope dims, v heads of v_head_dim;
    YaRN with mscale_all_dim scales the softmax too (transformers' yarn_apply_mscale)."""
    ql, r, dn, dr, dv = (d.get(k) for k in MLA_KEYS)
    if not all(isinstance(v, int) and v > 0 for v in (r, dn, dr, dv)) or not (isinstance(ql, int) and ql >= 0):
        raise NanotuneError(f"{where}: {', '.join(MLA_KEYS)} = {ql}, {r}, {dn}, {dr}, {dv} must be whole numbers > 0 "
                            "(q_lora_rank may be null); the file is incomplete or not a DeepSeek-V3 config.")
    fields = dict(latent=(ql or 0, r, dr, dv), head_dim=dn + dr)
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim") and rp.get("factor", 1) > 1:
        m = 0.1 * rp["mscale_all_dim"] * math.log(rp["factor"]) + 1
        fields["attention_multiplier"] = (dn + dr) ** -0.5 * m * m
    return fields


def mla_out(c, d: dict):
    ql, r, dr, dv = c.latent
    d.update(q_lora_rank=ql or None, kv_lora_rank=r, qk_nope_head_dim=c.head_dim - dr, qk_rope_head_dim=dr,
             v_head_dim=dv, head_dim=dr if c.model_type == "deepseek_v3" else c.head_dim)  # (DeepSeek's head_dim:
    #                                   the rotated part; Mistral 4's: nope + rope, with partial_rotary_factor)
    d.pop("attention_multiplier", None)
