"""nanotune families: the table of supported architectures and config.json <-> Config, both directions.

A family is one row: the class transformers builds, the llama.cpp architecture, the Config fields that make the
family what it is, and how its checkpoint names differ from nanotune's (Llama's) names. Everything else (sizes,
rope, kv heads, biases, windows) is read from config.json the same way for every family. The reference for
each row is transformers' `models/<name>/configuration_*.py` and `modeling_*.py`.

    cfg = config_from_hf(json.load(open("gemma-3-1b/config.json")))
    json.dump(config_to_hf(cfg), open("out/config.json", "w"))   # transformers reads it back as the same model
"""
import sys
from dataclasses import dataclass, field

from cli import NanotuneError
from model import Config
from keys import (GRANITE_SSM, MLA_KEYS, NEMOTRON_SSM, check_unread_keys, falcon_in, falcon_out, granite_hybrid_in,
                  granite_hybrid_out, lfm2_in, lfm2_out, mla_in, mla_out, nemotron_in, nemotron_out, qwen35_in,
                  qwen35_out, unknown_keys)
from rope import rope_from_hf


@dataclass(frozen=True)
class Family:
    hf_class: str  # transformers' class, written into config.json "architectures"
    gguf_arch: str  # llama.cpp's architecture name ("llama" rotates adjacent pairs: Q/K rows permuted)
    sets: dict = field(default_factory=dict)  # Config fields fixed by the family
    hf_keys: tuple = ()  # config.json keys read into the Config field of the same name and written back
    keys: dict = field(default_factory=dict)  # Config field -> the family's own config.json key for it
    defaults: dict = field(default_factory=dict)  # config.json values the family's config class assumes
    sliding: str = ""  # "always": sliding_window applies when set; "flag": only with use_sliding_window
    layer_types: str = ""  # default layer_types: "pattern" (sliding_window_pattern) | "max_window_layers" | "nope"
    #                        (SmolLM3: the NoPE layers slide)
    renames: dict = field(default_factory=dict)  # checkpoint name component -> nanotune's (Phi-2's dense -> o_proj)
    gguf_keys: dict = field(default_factory=dict)  # Config field -> GGUF key under the arch, both directions
    gguf_window: bool = False  # llama.cpp applies this arch's sliding window (else the export warns)
    template: str = "chatml"  # tokenizer.BUILTIN_TEMPLATES name, for a checkpoint that has no chat template
    gguf_pre: str = "gpt-2"  # llama.cpp pre-tokenizer of a byte-level BPE vocabulary the export cannot tell
    tied: bool = False  # tie_word_embeddings when config.json does not say
    experts: str = ""  # "input_major": stacked experts stored [E, in, out], gate/up columns interleaved (gpt-oss);
    #                    "transposed": stored [E, in, out], gate columns first (Llama 4); "stacked": as nanotune's
    aliases: dict = field(default_factory=dict)  # the family's config.json key -> the common keys it stands for
    rope_on: str = ""  # "sliding": with a sliding window set, only sliding layers rotate (full layers are NoPE)
    flags: dict = field(default_factory=dict)  # a config.json boolean -> (Config field, its value when true)
    converted: tuple = ()  # checkpoint name components that transformers 5 renames to nanotune's at load (Mixtral)
    memory: dict = field(default_factory=dict)  # renames of transformers 5's in-memory names only (PhiMoE's router)
    last_full: bool = False  # the default layer_types end with a full-attention layer whatever the pattern (Gemma 4)
    nested: str = ""  # a config.json sub-dict read as if its keys were top-level (MPT's attn_config)
    requires: dict = field(default_factory=dict)  # config.json keys nanotune does not implement -> the values it
    #                                               accepts (those at which the family computes what nanotune does)
    mtp: bool = False  # the checkpoint holds multi-token-prediction layers past num_hidden_layers (not loaded)
    layout: object = None  # (d, where) -> Config fields a family's own flags decide (Falcon's), d given the common
    #                        keys; and (Config, d) writes the flags back: a pair of functions
    reads: tuple = ()  # other config.json keys the family's own code reads (layout flags, Llama 4's MoE layers)
    inert: tuple = ()  # config.json keys of the family's config class that change nothing nanotune builds


GEMMA = dict(norm_offset=1.0, embed_scale=True, hidden_act="gelu_pytorch_tanh")
SOFTCAPS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
WINDOW = {"sliding_window": "attention.sliding_window"}
COHERE, COHERE_KEYS = dict(norm_type="layer_nobias", parallel_block=True, rope_interleaved=True), {
    "rms_norm_eps": "layer_norm_eps"}
DROPOUTS = ("residual_dropout", "embedding_dropout")  # (attention_dropout: every family, the same key)
EXPERTS_KEY = {"num_experts": "num_local_experts"}  # (config.json may say either; transformers reads both)
# what llama.cpp's MoE archs do with the top-k routing weights, whatever the file says (measured: they ignore
# {arch}.expert_weights_norm)
GGUF_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True, "gpt-oss": True, "olmoe": False,
                  "granitemoe": True}
GGUF_LEADING_DENSE = ("glm4moe", "ernie4_5-moe", "deepseek2", "mistral4")  # llama.cpp archs that read
#                                                                           leading_dense_block_count
GGUF_MOE = {"num_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
            "moe_intermediate_size": "expert_feed_forward_length"}
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
            "mlp_only_layers")
GEMMA3_DEFAULTS = dict(  # Gemma3TextConfig's defaults: multimodal checkpoints spell out only what differs
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=131_072,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window=4096, sliding_window_pattern=6,
    hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0)
MLA_MOE = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "n_shared_experts",
           "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor")  # (DeepSeek-V3, Mistral 4)
QWEN35 = dict(qk_norm="head", norm_offset=1.0, attn_output_gate=True, norm_topk_prob=True)
QWEN35_DEFAULTS = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                       linear_num_key_heads=16, linear_num_value_heads=32, head_dim=256,
                       rope_parameters={"partial_rotary_factor": 0.25})
QWEN35_READS = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                "linear_num_value_heads", "full_attention_interval")
GEMMA4_DEFAULTS = dict(  # Gemma4TextConfig's defaults (multimodal checkpoints spell out only what differs)
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, global_head_dim=512, sliding_window=512, sliding_window_pattern=6,
    hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144, max_position_embeddings=131_072,
    hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0, rope_parameters=dict(
        sliding_attention=dict(rope_type="default", rope_theta=10_000.0), full_attention=dict(
            rope_type="proportional", partial_rotary_factor=0.25, rope_theta=1_000_000.0)))
FAMILIES = {
    "llama": Family("LlamaForCausalLM", "llama"),
    "mistral": Family("MistralForCausalLM", "llama", sliding="always"),
    "ministral": Family("MinistralForCausalLM", "llama", sliding="always"),  # Ministral-8B: sliding / full layers
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", dict(qkv_bias=True, o_bias=False), sliding="flag",
                    layer_types="max_window_layers"),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", dict(qk_norm="head"), sliding="flag",
                    layer_types="max_window_layers"),
    "gemma": Family("GemmaForCausalLM", "gemma", GEMMA, template="gemma", tied=True),
    "gemma2": Family("Gemma2ForCausalLM", "gemma2", {**GEMMA, "post_norm": True}, SOFTCAPS, sliding="always",
                     defaults=dict(sliding_window_pattern=2), layer_types="pattern", template="gemma",
                     gguf_window=True, tied=True, gguf_keys={"attn_logit_softcapping": "attn_logit_softcapping",
                                                             "final_logit_softcapping": "final_logit_softcapping",
                                                             **WINDOW}),
    "gemma3_text": Family("Gemma3ForCausalLM", "gemma3", {**GEMMA, "post_norm": True, "qk_norm": "head"}, SOFTCAPS,
                          defaults=GEMMA3_DEFAULTS, sliding="always", layer_types="pattern", template="gemma3",
                          gguf_window=True, tied=True, gguf_keys=WINDOW),
    # Gemma 4: Gemma 3 without the norms' +1 and with attention scale 1, v normed, full layers with wider heads (and
    # k as v), proportional RoPE there, per-layer input embeddings, KV sharing, a scalar per layer
    "gemma4_text": Family("Gemma4ForCausalLM", "gemma4", dict(
        embed_scale=True, hidden_act="gelu_pytorch_tanh", post_norm=True, qk_norm="head", attention_multiplier=1.0,
        v_norm=True, layer_scalar=True), ("final_logit_softcapping", "attention_k_eq_v", "hidden_size_per_layer_input",
                                          "vocab_size_per_layer_input", "num_kv_shared_layers", "use_double_wide_mlp",
                                          "global_head_dim", "num_global_key_value_heads", "num_experts",
                                          "num_experts_per_tok", "moe_intermediate_size"),
        keys={"num_experts_per_tok": "top_k_experts"}, flags={"enable_moe_block": ("moe_block", True)},
        experts="stacked",
        defaults=GEMMA4_DEFAULTS, sliding="always", layer_types="pattern", last_full=True, template="gemma3",
        tied=True, gguf_window=True, reads=("per_layer_config",)),
    # LFM2: gated short convolutions (mixers.ShortConv) in the layers full_attn_idxs leaves out, per-head q/k norms
    "lfm2": Family("Lfm2ForCausalLM", "lfm2", dict(qk_norm="head"), keys={"rms_norm_eps": "norm_eps"}, tied=True,
                   defaults=dict(norm_eps=1e-5, conv_L_cache=3, block_auto_adjust_ff_dim=True, block_multiple_of=256,
                                 block_ffn_dim_multiplier=1.0), layout=(lfm2_in, lfm2_out),
                   reads=("conv_L_cache", "conv_bias", "full_attn_idxs", "block_auto_adjust_ff_dim",
                          "block_ffn_dim_multiplier", "block_multiple_of"),
                   renames={"self_attn.out_proj": "self_attn.o_proj", "q_layernorm": "q_norm", "k_layernorm": "k_norm",
                            "feed_forward": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
                            "operator_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                            "embedding_norm": "norm"}),
    "qwen3_5_text": Family("Qwen3_5ForCausalLM", "qwen35", QWEN35, defaults=QWEN35_DEFAULTS,
                           layout=(qwen35_in, qwen35_out), reads=QWEN35_READS),
    "qwen3_next": Family("Qwen3NextForCausalLM", "qwen3next", dict(QWEN35, fused_checkpoint=(
                             "in_proj_qkvz", "in_proj_ba")), MOE_KEYS + ("shared_expert_intermediate_size",),
                         defaults=QWEN35_DEFAULTS, layout=(qwen35_in, qwen35_out), reads=QWEN35_READS),
    "qwen3_5_moe_text": Family("Qwen3_5MoeForCausalLM", "qwen35moe", QWEN35, ("num_experts", "num_experts_per_tok",
                               "moe_intermediate_size", "shared_expert_intermediate_size"), dict(
                                   intermediate_size="moe_intermediate_size"), layout=(qwen35_in, qwen35_out),
                               defaults=dict(QWEN35_DEFAULTS, norm_topk_prob=True), reads=QWEN35_READS),
    "phi": Family("PhiForCausalLM", "phi2", dict(norm_type="layer", parallel_block=True, gated_mlp=False,
                                                  mlp_bias=True, lm_head_bias=True, qkv_bias=True, o_bias=True),
                  DROPOUTS, keys={"rms_norm_eps": "layer_norm_eps", "residual_dropout": "resid_pdrop",
                                  "embedding_dropout": "embd_pdrop"},
                  defaults=dict(rope_parameters={"partial_rotary_factor": 0.5}, hidden_act="gelu_new",
                                layer_norm_eps=1e-5),
                  renames=dict(dense="o_proj", fc1="up_proj", fc2="down_proj", final_layernorm="norm")),
    "phi3": Family("Phi3ForCausalLM", "phi3", dict(fused_checkpoint=("qkv_proj", "gate_up_proj")), sliding="always",
                   template="phi3", defaults=dict(original_max_position_embeddings=4096), gguf_keys=WINDOW),
    "olmo2": Family("Olmo2ForCausalLM", "olmo2", dict(pre_norm=False, post_norm=True, qk_norm="proj")),
    "olmo3": Family("Olmo3ForCausalLM", "olmo2", dict(pre_norm=False, post_norm=True, qk_norm="proj"),
                    defaults=dict(sliding_window=4096, sliding_window_pattern=4), sliding="always",
                    layer_types="pattern", gguf_window=True, gguf_keys=WINDOW),  # (Olmo 2, 3 sliding : 1 full layers)
    "glm4": Family("Glm4ForCausalLM", "glm4", dict(post_norm=True, o_bias=False, rope_interleaved=True,
                                                   fused_checkpoint=("gate_up_proj",)),
                   defaults=dict(attention_bias=True, head_dim=128, partial_rotary_factor=0.5, rms_norm_eps=1.5625e-7),
                   renames=dict(post_self_attn_layernorm="post_attention_layernorm",  # (sandwich norms, other names)
                                post_attention_layernorm="pre_feedforward_layernorm",
                                post_mlp_layernorm="post_feedforward_layernorm")),
    "exaone4": Family("Exaone4ForCausalLM", "exaone4", dict(pre_norm=False, post_norm=True, qk_norm="head"),
                      defaults=dict(sliding_window_pattern=4), sliding="always", layer_types="pattern",
                      rope_on="sliding", gguf_window=True, gguf_keys=WINDOW),  # (3 sliding : 1 full NoPE layers)
    "cohere": Family("CohereForCausalLM", "command-r", COHERE, ("logit_scale",), keys=COHERE_KEYS,
                     defaults=dict(logit_scale=0.0625, layer_norm_eps=1e-5), tied=True,
                     gguf_keys={"logit_scale": "logit_scale"}),  # (Command R: parallel block, bias-free LayerNorm)
    "cohere2": Family("Cohere2ForCausalLM", "cohere2", COHERE, ("logit_scale",), keys=COHERE_KEYS,
                      defaults=dict(logit_scale=0.0625, layer_norm_eps=1e-5, sliding_window=4096,
                                    sliding_window_pattern=4), sliding="always", layer_types="pattern",
                      rope_on="sliding", tied=True, gguf_window=True,
                      gguf_keys={"logit_scale": "logit_scale", **WINDOW}),
    "mixtral": Family("MixtralForCausalLM", "llama", dict(norm_topk_prob=True), ("num_experts", "num_experts_per_tok"),
                      EXPERTS_KEY, sliding="always", gguf_keys={k: GGUF_MOE[k] for k in ("num_experts",
                                                                                          "num_experts_per_tok")},
                      renames=dict(block_sparse_moe="mlp", w1="gate_proj", w3="up_proj", w2="down_proj"),
                      converted=("block_sparse_moe", "w1", "w2", "w3")),  # (transformers 5 stacks w1-3)
    "qwen2_moe": Family("Qwen2MoeForCausalLM", "qwen2moe", dict(qkv_bias=True, o_bias=False), MOE_KEYS + (
        "shared_expert_intermediate_size",), defaults=dict(norm_topk_prob=False), sliding="flag",
                        requires=dict(qkv_bias=(True,)),
                        layer_types="max_window_layers", gguf_keys={
                            **GGUF_MOE, "shared_expert_intermediate_size": "expert_shared_feed_forward_length"}),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", "qwen3moe", dict(qk_norm="head"), MOE_KEYS, EXPERTS_KEY,
                        defaults=dict(norm_topk_prob=False), sliding="flag", layer_types="max_window_layers",
                        gguf_keys=GGUF_MOE),
    "olmoe": Family("OlmoeForCausalLM", "olmoe", dict(qk_norm="proj"), ("num_experts", "num_experts_per_tok",
                                                                      "norm_topk_prob", "clip_qkv"),
                    defaults=dict(norm_topk_prob=False, num_experts=64, num_experts_per_tok=8),
                    gguf_keys={k: GGUF_MOE[k] for k in ("num_experts", "num_experts_per_tok")}),
    "granite": Family("GraniteForCausalLM", "granite", {}, ("embedding_multiplier", "residual_multiplier",
                                                             "attention_multiplier", "logits_scaling"),
                      gguf_keys={"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
                                 "attention_multiplier": "attention.scale", "logits_scaling": "logit_scale"}),
    # Granite MoE: Granite's multipliers, experts on every layer (top-k of the logits, softmaxed), stored stacked
    "granitemoe": Family("GraniteMoeForCausalLM", "granitemoe", dict(norm_topk_prob=True), (
        "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling", "num_experts",
        "num_experts_per_tok"), EXPERTS_KEY, renames={
            "block_sparse_moe": "mlp", "router": "gate", "router.layer": "gate",  # (the last: on disk; "router" in
            "input_linear.weight": "experts.gate_up_proj", "output_linear.weight": "experts.down_proj"},  # memory)
        converted=("router.layer", "input_linear.weight", "output_linear.weight"), experts="stacked",
        gguf_keys={"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
                   "attention_multiplier": "attention.scale", "logits_scaling": "logit_scale",
                   **{k: GGUF_MOE[k] for k in ("num_experts", "num_experts_per_tok")}}),
    "starcoder2": Family("Starcoder2ForCausalLM", "starcoder2", dict(norm_type="layer", gated_mlp=False), DROPOUTS,
                         keys={"rms_norm_eps": "norm_epsilon"}, aliases={"use_bias": ("attention_bias", "mlp_bias")},
                         defaults=dict(hidden_act="gelu_pytorch_tanh", norm_epsilon=1e-5, use_bias=True),
                         sliding="always", renames=dict(c_fc="up_proj", c_proj="down_proj"), tied=True),
    "smollm3": Family("SmolLM3ForCausalLM", "smollm3", {}, ("no_rope_layers",), sliding="flag", layer_types="nope",
                      tied=True),
    "seed_oss": Family("SeedOssForCausalLM", "seed_oss", {}, ("o_bias", "residual_dropout"),
                       keys={"o_bias": "attention_out_bias"}, defaults=dict(
                           attention_bias=True, attention_out_bias=False, attention_dropout=0.1, residual_dropout=0.1)),
    "ernie4_5": Family("Ernie4_5ForCausalLM", "ernie4_5", dict(rope_interleaved=True),
                       aliases={"use_bias": ("attention_bias", "mlp_bias")},
                       defaults=dict(use_bias=False, head_dim=128), tied=True),
    "hunyuan_v1_dense": Family("HunYuanDenseV1ForCausalLM", "hunyuan-dense", dict(qk_norm="head_post"),
                               renames=dict(query_layernorm="q_norm", key_layernorm="k_norm")),
    # PhiMoE (Phi-3.5-MoE): LayerNorms with biases, biases on attention and the head, the sparsemixer router (top-2),
    # LongRoPE with its own cos/sin scales by length
    "phimoe": Family("PhimoeForCausalLM", "phimoe", dict(norm_type="layer", router="sparsemixer"), (
        "num_experts", "num_experts_per_tok", "lm_head_bias", "router_jitter_noise"), EXPERTS_KEY, sliding="always",
        defaults=dict(rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        renames=dict(block_sparse_moe="mlp", w1="gate_proj", w3="up_proj", w2="down_proj"),
        converted=("block_sparse_moe", "w1", "w2", "w3"), memory={"router": "gate"}),
    # Apertus: Llama with per-head q/k norms, its norms named otherwise, a plain MLP with xIELU (parameters per layer)
    "apertus": Family("ApertusForCausalLM", "apertus", dict(qk_norm="head", gated_mlp=False, mlp_bias=False),
                      renames=dict(attention_layernorm="input_layernorm",
                                   feedforward_layernorm="post_attention_layernorm"),
                      defaults=dict(hidden_act="xielu", rms_norm_eps=1e-5, rope_parameters=dict(
                          rope_type="llama3", rope_theta=12_000_000.0, factor=8.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, high_freq_factor=4.0))),
    # Falcon: parallel attention + MLP from one LayerNorm (7B, Falcon 2) or two (40B / 180B), or sequential with
    # ALiBi and biases (falcon-rw); a fused q/k/v stored per kv group; an exact-GELU MLP; tied head
    "falcon": Family("FalconForCausalLM", "falcon", dict(norm_type="layer", gated_mlp=False, hidden_act="gelu",
                                                      fused_checkpoint=("qkv_proj",), qkv_grouped=True),
                     keys={"rms_norm_eps": "layer_norm_epsilon"}, tied=True, layout=(falcon_in, falcon_out),
                     reads=("new_decoder_architecture", "parallel_attn", "num_ln_in_parallel_attn", "num_kv_heads",
                            "multi_query", "ffn_hidden_size", "bias", "alibi", "hidden_dropout"),
                     requires=dict(activation=("gelu",)),
                     renames={"transformer.word_embeddings": "model.embed_tokens", "transformer.h": "model.layers",
                              "transformer.ln_f": "model.norm", "self_attention": "self_attn",
                              "query_key_value": "qkv_proj", "dense": "o_proj", "dense_h_to_4h": "up_proj",
                              "dense_4h_to_h": "down_proj"}, gguf_pre="falcon"),
    # MPT: ALiBi (no RoPE), fused Wqkv, bias-free LayerNorm, a plain exact-GELU MLP 4x wide, no biases, tied head
    "mpt": Family("MptForCausalLM", "mpt", dict(alibi="mpt", norm_type="layer_nobias", gated_mlp=False,
                                            hidden_act="gelu", fused_checkpoint=("qkv_proj",)),
                  ("clip_qkv", "attention_multiplier"),
                  keys={"rms_norm_eps": "layer_norm_epsilon", "attention_multiplier": "softmax_scale"}, aliases={
                      "d_model": ("hidden_size",), "n_heads": ("num_attention_heads",),
                      "n_layers": ("num_hidden_layers",), "max_seq_len": ("max_position_embeddings",)},
                  nested="attn_config", requires=dict(
                      no_bias=(True,), expansion_ratio=(4,), logit_scale=(None,), alibi=(True,), alibi_bias_max=(8,),
                      qk_ln=(False,), attn_type=("multihead_attention",), prefix_lm=(False,), attn_pdrop=(0, 0.0),
                      attn_uses_sequence_id=(False,), norm_type=("low_precision_layernorm", "layernorm")),
                  renames={"transformer.wte": "model.embed_tokens", "transformer.blocks": "model.layers",
                           "transformer.norm_f": "model.norm", "norm_1": "input_layernorm",
                           "norm_2": "post_attention_layernorm", "attn": "self_attn", "Wqkv": "qkv_proj",
                           "out_proj": "o_proj", "ffn": "mlp"}, tied=True,
                  gguf_keys={"clip_qkv": "attention.clamp_kqv"},  # (transformers' MPT ignores these: ALiBi,
                  inert=("init_device", "learned_pos_emb", "embedding_fraction")),  # no positions; a gradient scale)
    # Granite 4.0-H: Granite MoE's layers with Mamba2 on "linear_attention" layers, attention without RoPE (unless
    # position_embedding_type "rope"), a shared MLP (input_linear: gate and up rows) beside the experts or alone
    "granitemoehybrid": Family(
        "GraniteMoeHybridForCausalLM", "granitehybrid", dict(norm_topk_prob=True, fused_checkpoint=("gate_up_proj",)), (
            "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling", "num_experts",
            "num_experts_per_tok"), EXPERTS_KEY, renames={
            "block_sparse_moe": "mlp", "router": "gate", "router.layer": "gate",
            "shared_mlp.input_linear": "shared_mlp.gate_up_proj", "shared_mlp.output_linear": "shared_mlp.down_proj",
            "input_linear.weight": "experts.gate_up_proj", "output_linear.weight": "experts.down_proj",
            "input_linear": "gate_up_proj", "output_linear": "down_proj"},  # (the last two: bare PEFT targets)
        converted=("router.layer", "input_linear.weight", "output_linear.weight", "input_linear", "output_linear"),
        experts="stacked",
        defaults=dict(num_local_experts=8, num_experts_per_tok=2, mamba_n_heads=128, mamba_n_groups=1,
                      mamba_d_state=256, mamba_d_head="auto", mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
                      mamba_conv_bias=True, mamba_proj_bias=False, shared_intermediate_size=1024),
        layout=(granite_hybrid_in, granite_hybrid_out), reads=GRANITE_SSM),
    # Nemotron-H: every layer x + mixer(norm(x)) with one mixer by layers_block_type: Mamba2, attention (no RoPE, no
    # biases), a plain relu^2 MLP, or MoE (Nemotron 3: DeepSeek-V3's router, plain relu^2 experts, optionally in a
    # latent width, a shared expert); the checkpoint's body is "backbone."
    "nemotron_h": Family(
        "NemotronHForCausalLM", "nemotron_h", dict(single_mixer=True, gated_mlp=False, router="sigmoid",
                                                   shared_expert_gated=False),
        MLA_MOE[:4] + MLA_MOE[6:] + ("shared_expert_intermediate_size", "moe_latent_size"), keys={
            "rms_norm_eps": "layer_norm_epsilon", "num_experts": "n_routed_experts",
            "shared_expert_intermediate_size": "moe_shared_expert_intermediate_size"},
        aliases={"mlp_hidden_act": ("hidden_act",)},
        renames={"backbone.norm_f": "model.norm", "backbone": "model", "embeddings": "embed_tokens",
                 "shared_experts": "shared_expert", "gate.e_score_correction_bias": "e_score_correction_bias",
                 "experts.up_proj": "experts.gate_up_proj"},  # (its plain experts' stacked up_proj: in memory)
        memory={"model.norm_f": "model.norm"}, converted=("backbone.norm_f", "backbone"),
        defaults=dict(vocab_size=131072, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      intermediate_size=21504, mlp_hidden_act="relu2", ssm_state_size=128, mamba_num_heads=128,
                      mamba_head_dim=64, n_groups=8, conv_kernel=4, chunk_size=128, use_conv_bias=True, use_bias=False,
                      layer_norm_epsilon=1e-5),
        requires=dict(mamba_hidden_act=("silu",)), layout=(nemotron_in, nemotron_out), reads=NEMOTRON_SSM,
        inert=("expand", "mamba_expand", "mamba_proj_bias", "time_step_max", "time_step_floor", "time_step_min",
               "mamba_dt_max", "mamba_dt_init_floor", "mamba_dt_min", "residual_in_fp32", "rescale_prenorm_residual",
               "hidden_dropout", "num_logits_to_keep", "use_mamba_kernels", "mamba_ssm_cache_dtype",
               "n_shared_experts", "moe_shared_expert_overlap", "num_nextn_predict_layers", "mtp_layers_block_type"),
        mtp=True),  # (unused by transformers' model: init and kernel switches; the MTP layers are not loaded)
    "arcee": Family("ArceeForCausalLM", "arcee", dict(gated_mlp=False), defaults=dict(hidden_act="relu2")),
    # GLM-4.5: sigmoid router with a selection bias and expert groups, an ungated shared expert, dense first layers
    "deepseek_v3": Family("DeepseekV3ForCausalLM", "deepseek2", dict(router="sigmoid", shared_expert_gated=False),
                          MLA_MOE, {"num_experts": "n_routed_experts"}, defaults=dict(
                              n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
                              moe_intermediate_size=2048, first_k_dense_replace=3, norm_topk_prob=True, n_group=8,
                              topk_group=4,
                              routed_scaling_factor=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                              qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True),
                          renames={"shared_experts": "shared_expert", "gate.e_score_correction_bias":
                                   "e_score_correction_bias"}, flags={"rope_interleave": ("rope_interleaved", True)},
                          mtp=True, inert=("num_nextn_predict_layers", "num_mtp_layers", "pretraining_tp",
                                           "qk_head_dim"),  # (qk_head_dim: nope + rope, derived)
                          layout=(mla_in, mla_out), reads=MLA_KEYS),
    # Mistral 4: DeepSeek-V3's layers with a softmax router over groups (the other groups' scores 0, no bias), no
    # dense first layers, YaRN, and Ministral 3's query temperature by position (llama_4_scaling_beta)
    "mistral4": Family("Mistral4ForCausalLM", "mistral4", dict(shared_expert_gated=False), MLA_MOE,
                       {"num_experts": "n_routed_experts"}, defaults=dict(
                           n_routed_experts=128, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=2048,
                           first_k_dense_replace=0, norm_topk_prob=True, n_group=1, topk_group=1,
                           routed_scaling_factor=1.0, q_lora_rank=1024, kv_lora_rank=256, qk_nope_head_dim=64,
                           qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True),
                       renames={"shared_experts": "shared_expert"}, experts="stacked",  # (no per-expert names on disk)
                       flags={"rope_interleave": ("rope_interleaved", True)}, layout=(mla_in, mla_out), reads=MLA_KEYS,
                       inert=("pretraining_tp", "qk_head_dim", "output_router_logits")),
    "glm4_moe": Family("Glm4MoeForCausalLM", "glm4moe", dict(router="sigmoid", shared_expert_gated=False, o_bias=False),
                       ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                        "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor"),
                       {"num_experts": "n_routed_experts"}, defaults=dict(
                           partial_rotary_factor=0.5, n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1,
                           moe_intermediate_size=1408, first_k_dense_replace=1, norm_topk_prob=True),
                       renames={"shared_experts": "shared_expert", "gate.e_score_correction_bias":
                                "e_score_correction_bias"}, flags={"use_qk_norm": ("qk_norm", "head")}, mtp=True,
                       inert=("num_nextn_predict_layers",),  # (the MTP layers past the last: not loaded)
                       gguf_keys={**GGUF_MOE, "n_shared_experts": "expert_shared_count", "first_k_dense_replace":
                                  "leading_dense_block_count", "routed_scaling_factor": "expert_weights_scale",
                                  "norm_topk_prob": "expert_weights_norm", "n_group": "expert_group_count",
                                  "topk_group": "expert_group_used_count"}),
    # ERNIE 4.5 MoE: softmax router with a selection bias, an ungated shared expert, sparse layers from
    # moe_layer_start_index to moe_layer_end_index every moe_layer_interval
    "ernie4_5_moe": Family("Ernie4_5_MoeForCausalLM", "ernie4_5-moe", dict(
        rope_interleaved=True, router="softmax_bias", shared_expert_gated=False, norm_topk_prob=True),
        ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
         "decoder_sparse_step", "moe_layer_end_index", "lm_head_bias"), dict(
            num_experts="moe_num_experts", num_experts_per_tok="moe_k", n_shared_experts="moe_num_shared_experts",
            first_k_dense_replace="moe_layer_start_index", decoder_sparse_step="moe_layer_interval"),
        aliases={"use_bias": ("attention_bias", "mlp_bias", "lm_head_bias")}, tied=True, defaults=dict(
            use_bias=False, head_dim=128, moe_num_experts=64, moe_k=6, moe_num_shared_experts=2,
            moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1, moe_intermediate_size=1536),
        renames={"shared_experts": "shared_expert", "moe_statics.e_score_correction_bias":
                 "e_score_correction_bias"}, gguf_keys={
            **GGUF_MOE, "n_shared_experts": "expert_shared_count", "first_k_dense_replace": "leading_dense_block_count",
            "decoder_sparse_step": "interleave_moe_layer_step"}),
    # Llama 4: RoPE on adjacent pairs, chunked attention on RoPE layers (weightless q/k norms after RoPE), NoPE layers
    # with tuned query temperature, MoE every n-th layer: sigmoid-scaled inputs to the top-k experts plus a shared one
    "llama4_text": Family("Llama4ForCausalLM", "llama4", dict(
        rope_interleaved=True, router="sigmoid_input", shared_expert_gated=False, temperature_offset=1,
        temperature_nope_only=True), (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
        "decoder_sparse_step", "no_rope_layers", "attention_chunk_size", "floor_scale", "attn_scale"), dict(
        num_experts="num_local_experts", intermediate_size="intermediate_size_mlp", moe_intermediate_size=
        "intermediate_size", shared_expert_intermediate_size="intermediate_size",
        decoder_sparse_step="interleave_moe_layer_step"), defaults=dict(
        head_dim=128, num_key_value_heads=8, rms_norm_eps=1e-5, intermediate_size=8192, rope_parameters=dict(
            rope_type="default", rope_theta=500_000.0),
        intermediate_size_mlp=16384, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
        use_qk_norm=True), flags={"use_qk_norm": ("qk_norm", "rms_post")}, renames=dict(
        feed_forward="mlp", router="gate"), experts="transposed", gguf_keys={
            **GGUF_MOE, "decoder_sparse_step": "interleave_moe_layer_step"}, reads=("attn_temperature_tuning",
                                                                                     "moe_layers")),
    # Ministral 3: Mistral with YaRN and the queries scaled by 1 + beta ln(1 + floor(position / original context))
    "ministral3": Family("Ministral3ForCausalLM", "mistral3", sliding="always"),
    # gpt-oss: sinks, biased router and experts, clamped SwiGLU, alternating sliding (128) / full layers, YaRN
    "gpt_oss": Family("GptOssForCausalLM", "gpt-oss", dict(norm_topk_prob=True, attention_sinks=True, router_bias=True,
                                                        expert_bias=True),
                      ("num_experts", "num_experts_per_tok", "swiglu_limit", "swiglu_alpha"), EXPERTS_KEY,
                      defaults=dict(head_dim=64, rms_norm_eps=1e-5, sliding_window=128, sliding_window_pattern=2,
                                    attention_bias=True,
                                    swiglu_limit=7.0, swiglu_alpha=1.702, rope_parameters=dict(
                                        rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                        beta_slow=1.0, truncate=False, original_max_position_embeddings=4096)),
                      sliding="always", layer_types="pattern", renames=dict(router="gate"), experts="input_major",
                      gguf_window=True, gguf_keys={**GGUF_MOE, **WINDOW},  # (transformers reads the
                      inert=("experts_per_token", "initial_context_length")),  # other names of these)
}
GGUF_FAMILY = {f.gguf_arch: mt for mt, f in reversed(FAMILIES.items())}  # GGUF arch -> model_type (the first row)
GGUF_FAMILY["nemotron_h_moe"] = "nemotron_h"  # (llama.cpp's arch for Nemotron-H with MoE layers)
# vision-language configs whose text tower nanotune trains
MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "llama4": "llama4_text", "mistral3": "ministral3",
              "qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new", "relu2", "xielu", "gelu")  # gelu_new: tanh-GELU; the
#                                                                                      last three: plain MLPs only


def text_config(d: dict) -> dict:
    """A vision-language config.json (Gemma 3, Llama 4, Mistral 3, Qwen3.5) -> its text tower's config (the rest of
    the file is the vision side)."""
    if d.get("model_type") in MULTIMODAL:
        text = d.get("text_config") or {}
        mt = text.get("model_type")  # (Mistral 3's text tower may be Mistral 4's)
        tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))  # (transformers ties by the
        return {**text, "tie_word_embeddings": tied,  # outer config's flag where it has one)
                "model_type": mt if mt in FAMILIES else MULTIMODAL[d["model_type"]]}
    return d


NULL_IS_ZERO = ("hidden_size_per_layer_input", "q_lora_rank")  # an explicit null that means "none" (Gemma 4's 26B:
#                                                  no PLE; DeepSeek-V2-Lite: q without a bottleneck)


def config_from_hf(d: dict, where: str = "config.json") -> Config:
    """config.json (transformers 4.4x or 5.x) -> Config."""
    d = text_config(d)
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise NanotuneError(f"{where}: model_type {mt!r} is not supported; nanotune runs {', '.join(FAMILIES)}.")
    fam = FAMILIES[mt]
    if unknown := unknown_keys(d, fam):
        print(f"warning: {where}: nanotune does not know {', '.join(unknown)} for {mt}; if they change the model, "
              "nanotune does not implement them (check the checkpoint's own modeling code).", file=sys.stderr)
    d = {**fam.defaults, **{k: 0 if v is None else v for k, v in d.items() if v is not None or k in NULL_IS_ZERO},
         **(d.get(fam.nested) or {} if fam.nested else {})}
    for k, ok in fam.requires.items():
        if d.get(k, ok[0]) not in ok:
            raise NanotuneError(f"{where}: {k}={d[k]!r} is not supported for {mt}; nanotune computes {mt} as {k}="
                                f"{ok[0]!r} (the checkpoint's own code may ignore the key: check it).")
    for i, layer in (d.pop("per_layer_config", None) or {}).items():  # Gemma 4 as transformers 5.24 saves it: the
        if (d.get("layer_types") or [""] * (int(i) + 1))[int(i)] == "full_attention":  # full layers' geometry
            d.update(global_head_dim=layer.get("head_dim", d.get("head_dim")), num_global_key_value_heads=layer.get(
                "num_key_value_heads", d.get("num_key_value_heads")))
    if "no_rope_layers" in fam.hf_keys and not d.get("no_rope_layers"):  # SmolLM3, Llama 4: NoPE every n-th layer
        n = d.get("no_rope_layer_interval", 4)
        d["no_rope_layers"] = [int((i + 1) % n != 0) for i in range(d.get("num_hidden_layers") or 0)]
    for k, common in fam.aliases.items():  # (StarCoder2's use_bias: attention_bias and mlp_bias)
        d.update({c: d[k] for c in common if k in d})
    if "expansion_ratio" in fam.requires:  # MPT: multi-head, the MLP 4x wide (whatever stray keys a save kept)
        d.update(intermediate_size=4 * d["hidden_size"], num_key_value_heads=d["num_attention_heads"])
    check_unread_keys(d, fam, mt, where)
    fields = fam.layout[0](d, where) if fam.layout else {}
    if "num_experts" in d:  # (Qwen3-MoE configs say either)
        d.setdefault("num_local_experts", d["num_experts"])
    if d.get("qk_layernorm"):
        raise NanotuneError(f"{where}: qk_layernorm=true (a Phi variant) is not supported.")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim"):  # (the last two may be absent: derived below)
        v, k = d.get(fam.keys.get(k, k)), fam.keys.get(k, k)  # (Llama 4's dense width: intermediate_size_mlp)
        if (v is not None or k not in ("num_key_value_heads", "head_dim")) and (
                not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise NanotuneError(f"{where}: {k} is {'missing' if v is None else repr(v)}, but a {mt} model needs it "
                                "as a whole number > 0; the file is incomplete or not this model's config.")
    theta, scaling, local = rope_from_hf(d, where)
    heads, hidden = d["num_attention_heads"], d["hidden_size"]
    rp = d.get("rope_parameters") or {}
    c = Config(model_type=mt, vocab_size=d["vocab_size"], hidden_size=hidden,
               intermediate_size=d[fam.keys.get("intermediate_size", "intermediate_size")],
               num_hidden_layers=d["num_hidden_layers"],
               num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
               head_dim=d.get("head_dim") or hidden // heads,
               rms_norm_eps=d.get(fam.keys.get("rms_norm_eps", "rms_norm_eps"), 1e-6),
               rope_theta=theta, rope_scaling=scaling, local_rope_theta=local,
               partial_rotary_factor=d.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0)),
               max_position_embeddings=d.get("max_position_embeddings", 4096),
               tie_word_embeddings=d.get("tie_word_embeddings", fam.tied),
               hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "silu",
               mlp_bias=bool(d.get("mlp_bias", False)), bos_token_id=d.get("bos_token_id"),
               eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))
    c.qkv_bias = c.o_bias = bool(d.get("attention_bias", False))
    c.attention_dropout = float(d.get("attention_dropout") or 0.0)
    for k, v in fam.sets.items():
        setattr(c, k, v)
    for k, v in fields.items():
        setattr(c, k, v)
    for k in fam.hf_keys:  # (query_pre_attn_scalar defaults to head_dim, Granite's multipliers to 1)
        default = c.head_dim if k == "query_pre_attn_scalar" else getattr(c, k)
        setattr(c, k, d.get(fam.keys.get(k, k), default))
    for k, (f, v) in fam.flags.items():
        if d.get(k):
            setattr(c, f, v)
    if c.router == "sparsemixer" and c.num_experts_per_tok != 2:
        raise NanotuneError(f"{where}: num_experts_per_tok={c.num_experts_per_tok}, but PhiMoE's router always takes "
                            "2 experts (transformers ignores the key there too); set it to 2.")
    if c.num_experts:  # Mixtral's experts are intermediate_size wide; the load-balancing loss trains only when
        c.moe_intermediate_size = c.moe_intermediate_size or c.intermediate_size  # the config asks for router
        c.router_aux_loss_coef = d.get("router_aux_loss_coef", 0.0) if d.get("output_router_logits") else 0.0
    if fam.sliding == "always" or (fam.sliding == "flag" and d.get("use_sliding_window")):
        c.sliding_window = d.get("sliding_window")
    if c.sliding_window:
        c.layer_types = d.get("layer_types")
        L = c.num_hidden_layers
        if c.layer_types is None and fam.layer_types == "pattern":  # N-1 sliding layers, then a full one
            n = d["sliding_window_pattern"]
            if not isinstance(n, int):
                raise NanotuneError(f"{where}: sliding_window_pattern {n!r} without layer_types; add layer_types "
                                    "(one entry per layer, as transformers writes them).")
            c.layer_types = ["sliding_attention" if (i + 1) % n and not (fam.last_full and i == L - 1)
                             else "full_attention" for i in range(L)]
        if c.layer_types is None and fam.layer_types == "nope":
            c.layer_types = ["full_attention" if c.has_rope(i) else "sliding_attention" for i in range(L)]
        if c.layer_types is None and fam.layer_types == "max_window_layers":
            first = d.get("max_window_layers", 0)
            c.layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(L)]
    if c.attention_chunk_size:  # Llama 4: the RoPE layers attend within chunks
        c.layer_types = d.get("layer_types") or ["chunked_attention" if c.has_rope(i) else "full_attention"
                                                 for i in range(c.num_hidden_layers)]
    if d.get("attn_temperature_tuning") is False:
        c.attn_scale = 0.0
    if d.get("moe_layers") is not None and d["moe_layers"] != [i for i in range(c.num_hidden_layers) if c.is_sparse(i)]:
        c.decoder_sparse_step = 1
        c.mlp_only_layers = [i for i in range(c.num_hidden_layers) if i not in d["moe_layers"]]
        #                                                                   (Llama 4 may list its sparse layers)
    if rp.get("llama_4_scaling_beta"):  # Ministral 3's query temperature (in the rope dict, whatever its type)
        c.attn_scale, c.floor_scale = rp["llama_4_scaling_beta"], rp["original_max_position_embeddings"]
    if fam.rope_on == "sliding" and c.sliding_window:  # (EXAONE 4.0: full layers without RoPE)
        c.no_rope_layers = [int(c.is_sliding(i)) for i in range(c.num_hidden_layers)]
    if c.attention_dropout and c.attention_sinks:
        raise NanotuneError(f"{where}: attention_dropout={c.attention_dropout} with attention sinks is not supported; "
                            "set it to 0.")
    for k in ("attention_dropout", *DROPOUTS):
        if not 0 <= getattr(c, k) < 1:
            raise NanotuneError(f"{where}: {fam.keys.get(k, k)}={getattr(c, k)!r} is not a dropout probability; "
                                "it must be in [0, 1).")
    if c.hidden_act not in ACTIVATIONS or (c.gated_mlp and c.hidden_act in ("relu2", "xielu", "gelu")):
        raise NanotuneError(f"{where}: activation {c.hidden_act!r} is not supported in a {mt} model "
                            f"({', '.join(ACTIVATIONS[:3])}; relu2 and xielu in a plain MLP).")
    return c


def gguf_values(c: Config) -> dict:
    """The family's own GGUF keys (under the arch) and their values."""
    out = {gk: getattr(c, k) for k, gk in FAMILIES[c.model_type].gguf_keys.items() if getattr(c, k) is not None}
    if c.attn_scale and not c.temperature_nope_only:  # Ministral 3's query temperature
        out.update({"attention.temperature_scale": c.attn_scale, "attention.temperature_length": int(c.floor_scale)})
    if c.alibi:  # (MPT's slopes: 2^(-8 i / P))
        out["attention.max_alibi_bias"] = 8.0
    if c.n_shared_experts:  # (GLM-4.5 / ERNIE 4.5: a shared expert this wide)
        out["expert_shared_feed_forward_length"] = c.n_shared_experts * c.moe_intermediate_size
    if c.router == "sigmoid":  # (llama.cpp: 1 softmax, 2 sigmoid)
        out.update(expert_gating_func=2, nextn_predict_layers=0)
    return out


def config_to_hf(c: Config) -> dict:
    """Config -> config.json that transformers (4.4x and 5.x) reads back as the same model."""
    fam = FAMILIES[c.model_type]
    d = {"architectures": [fam.hf_class], "model_type": c.model_type}
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
              "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
              *fam.hf_keys):
        d[fam.keys.get(k, k)] = getattr(c, k)
    scaling = c.rope_scaling or {}
    if scaling.get("rope_type") != "proportional":  # (transformers 5 only: Gemma 4 has no legacy key)
        d["rope_scaling"] = c.rope_scaling
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta, **scaling}
    if "original_max_position_embeddings" in scaling:  # Phi-3 reads it from the top level only
        d["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if c.local_rope_theta:  # Gemma 3: a rotation per layer type
        d["rope_local_base_freq"] = c.local_rope_theta
        d["rope_parameters"] = {"full_attention": d["rope_parameters"],
                                "sliding_attention": {"rope_type": "default", "rope_theta": c.local_rope_theta}}
    if c.attn_scale and not c.temperature_nope_only:  # Ministral 3
        d["rope_parameters"].update(llama_4_scaling_beta=c.attn_scale, original_max_position_embeddings=c.floor_scale)
    if c.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = c.partial_rotary_factor
        if not c.local_rope_theta:
            d["rope_parameters"]["partial_rotary_factor"] = c.partial_rotary_factor
    if c.num_experts:  # (logits, as transformers trains with it only then)
        d["router_aux_loss_coef"], d["output_router_logits"] = c.router_aux_loss_coef, c.router_aux_loss_coef > 0
    if "qkv_bias" not in fam.sets:
        d["attention_bias"] = c.qkv_bias
    if "mlp_bias" not in fam.sets:
        d["mlp_bias"] = c.mlp_bias
    if "hidden_act" in fam.sets:
        d["hidden_activation"] = c.hidden_act
    for k, common in fam.aliases.items():
        d[k] = d[common[0]]
    for k, (f, v) in fam.flags.items():
        d[k] = getattr(c, f) == v
    if fam.layout:
        fam.layout[1](c, d)
    if fam.nested:  # (MPT: attn_config)
        d[fam.nested] = {fam.keys.get(k, k): d.pop(fam.keys.get(k, k)) for k in fam.hf_keys}
    if fam.sliding:
        d["sliding_window"] = c.sliding_window
        d["use_sliding_window"] = bool(c.sliding_window)
    if c.layer_types:
        d["layer_types"] = c.layer_types
    if fam.keys.get("decoder_sparse_step") == "interleave_moe_layer_step":  # Llama 4
        d["moe_layers"] = [i for i in range(c.num_hidden_layers) if c.is_sparse(i)]
        d["attn_temperature_tuning"] = bool(c.attn_scale)
    return d
