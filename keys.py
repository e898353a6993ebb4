"""nanotune config keys: which config.json keys change the math (MATH_KEYS, with the values at which they change
nothing), which never do (INERT), which config_from_hf reads for every family (READ), and the checks families.py
runs on each config.json: a math key a family does not implement is refused in one sentence, a key in no list is
named in one warning line. `fam` is a families.Family row (read by attribute only: this file imports nothing of
nanotune but the error type)."""
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
        {"linear_attention"} if "linear_num_key_heads" in fam.reads else set())
    if types - {"full_attention", "sliding_attention"} or ("sliding_attention" in types and not fam.sliding):
        raise NanotuneError(f"{where}: layer_types holds {sorted(types)}; nanotune's {mt} runs "
                            f"{'full and sliding' if fam.sliding else 'only full'} attention layers.")
