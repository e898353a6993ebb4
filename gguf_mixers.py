"""GGUF for the families whose layers are not all plain softmax attention: LFM2 (`lfm2`), Granite 4.0-H
(`granitehybrid`), Nemotron-H (`nemotron_h`), Qwen3.5 (`qwen35`, `qwen35moe`), Qwen3-Next (`qwen3next`) and
multi-head latent attention (DeepSeek-V3 `deepseek2`, Mistral 4 `mistral4`), in the layout llama.cpp's converter
writes and its graphs read (convert_hf_to_gguf.py's LFM2Model, GraniteHybridModel, NemotronHModel, Qwen3NextModel,
Qwen3_5TextModel, DeepseekV2Model, checked against llama-cpp-python's logits in tests/test_export.py). formats.py
writes the common keys and tensors; this file adds each arch's own: which layers recur (a per-layer kv-head count
of 0, or Qwen3.5's recurrent_layers flags), the SSM sizes, and the tensors llama.cpp stores differently:

    conv1d [C, 1, K]  -> ssm_conv1d [C, K]            (shortconv.conv for LFM2)
    A_log  [nh]       -> ssm_a = -exp(A_log)          ([nh, 1] for Mamba2, [nh] for Qwen3.5)
    D      [nh]       -> ssm_d [nh, 1];  the gated norm [d_in] -> ssm_norm [G, d_in / G] (Mamba2's groups)
    Qwen3.5: value heads regrouped from HF's key-head-major order (head g r + i) to ggml's tiled one (i nk + g)
    Qwen3-Next: its fused in_proj_qkvz (per key head) -> attn_qkv (q, k, v of every head) and attn_gate (z)
    Granite 4.0-H's shared MLP input_linear [2S, C] -> its gate and up halves (ffn_*_shexp; ffn_* without experts)
    MLA: kv_b_proj [H (nope + v), r] -> attn_k_b [H, r, nope] (k's part, transposed) and attn_v_b [H, v, r]; the
    rotated rows of q and of the key in adjacent pairs (llama.cpp's rope) where the checkpoint rotates halves

Each entry of `table(cfg)` is (checkpoint name, GGUF name, transform); reading a GGUF back inverts it, the split
halves landing on nanotune's own gate_proj / up_proj."""
import math

import torch

from cli import NanotuneError
from families import FAMILIES
from model import Config
from names import fused_order, fused_sizes

QWEN = ("qwen35", "qwen35moe", "qwen3next")  # (Gated DeltaNet)
ARCHS = ("lfm2", "granitehybrid", "nemotron_h", "nemotron_h_moe", *QWEN, "deepseek2", "mistral4")
MLA = ("deepseek2", "mistral4")


def arch_of(cfg: Config) -> str:
    """llama.cpp's arch for the model (Nemotron-H with experts is its own: nemotron_h_moe)."""
    arch = FAMILIES[cfg.model_type].gguf_arch
    return "nemotron_h_moe" if arch == "nemotron_h" and cfg.num_experts else arch


def check(cfg: Config):
    """Refuse, in one sentence, what llama.cpp's graph for the arch cannot run."""
    arch, why = arch_of(cfg), None
    if arch == "lfm2" and cfg.conv_bias:
        why = "loads no convolution or projection biases, and this model has conv_bias"
    if arch in ("granitehybrid", "nemotron_h", "nemotron_h_moe"):
        nh, P, G, N, K, conv_bias, bias, chunk, lo, hi = cfg.ssm
        if bias:
            why = "loads no Mamba2 in_proj / out_proj biases, and this model has them"
        elif math.isfinite(hi) or (arch == "granitehybrid" and lo):
            why = f"never clamps the Mamba2 time step, and this model clamps it to [{lo}, {hi}]"
        elif arch == "granitehybrid" and nh * P != 2 * cfg.hidden_size:
            why = "requires the Mamba2 width to be twice hidden_size"
        elif arch == "nemotron_h_moe" and "mlp" in cfg.layer_types:
            why = "makes every MLP layer of a model with experts an MoE one, and this model has plain MLP layers too"
        elif arch == "nemotron_h_moe" and cfg.mlp_bias:
            why = "loads no biases on the experts' latent projections, and this model has mlp_bias"
    s = cfg.rope_scaling or {}
    if arch in MLA and s.get("rope_type") == "yarn" and s.get("mscale", 0) != s.get("mscale_all_dim", 0):
        why = "scales YaRN's attention by mscale_all_dim alone, and this model's mscale differs from it"
    if arch in QWEN and cfg.linear_heads[2] != cfg.linear_heads[3]:
        why = "sizes the linear attention's value heads by its key heads, and this model's differ"
    if why:
        raise NanotuneError(f"llama.cpp's {arch} {why}, so its GGUF would be wrong; export --format merged instead.")


def keys(cfg: Config) -> dict:
    """The arch's own GGUF keys (under the arch), over the common ones formats.py writes ({} for other archs)."""
    arch, types = arch_of(cfg), cfg.layer_types or [""] * cfg.num_hidden_layers
    if arch not in ARCHS:
        return {}
    attn = [t not in ("conv", "linear_attention", "mlp", "moe") for t in types]
    out = {"attention.head_count_kv": [cfg.num_key_value_heads if a else 0 for a in attn]}
    if arch == "lfm2":
        out["shortconv.l_cache"] = cfg.conv_kernel
    if arch in ("granitehybrid", "nemotron_h", "nemotron_h_moe"):
        nh, P, G, N, K = cfg.ssm[:5]
        out.update({"ssm.conv_kernel": K, "ssm.state_size": N, "ssm.group_count": G, "ssm.inner_size": nh * P,
                    "ssm.time_step_rank": nh})
    if arch == "granitehybrid":  # (its flag for RoPE; without experts the shared MLP is the layer's MLP)
        out["rope.scaling.finetuned"] = cfg.no_rope_layers is None or any(cfg.no_rope_layers)
        out.update({"embedding_scale": float(cfg.embedding_multiplier), "residual_scale": float(
            cfg.residual_multiplier), "attention.scale": float(cfg.attention_multiplier or cfg.head_dim**-0.5),
            "logit_scale": float(cfg.logits_scaling), "expert_count": cfg.num_experts,
            "expert_used_count": cfg.num_experts_per_tok if cfg.num_experts else 0,
            "expert_shared_feed_forward_length": cfg.shared_mlp,
            "feed_forward_length": cfg.moe_intermediate_size if cfg.num_experts else cfg.shared_mlp})
    if arch == "nemotron_h_moe":  # (its MoE layers by a nonzero width; DeepSeek-V3's router)
        out.update({"expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok,
                    "expert_feed_forward_length": cfg.moe_intermediate_size, "expert_shared_count": 1,
                    "expert_shared_feed_forward_length": cfg.shared_expert_intermediate_size,
                    "expert_weights_norm": bool(cfg.norm_topk_prob), "expert_gating_func": 2,
                    "expert_weights_scale": float(cfg.routed_scaling_factor), "expert_group_count": cfg.n_group,
                    "expert_group_used_count": cfg.topk_group, "moe_latent_size": cfg.moe_latent_size})
    if arch in ("nemotron_h", "nemotron_h_moe"):
        width = cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size
        out.update({"feed_forward_length": [width if t in ("mlp", "moe") else 0 for t in types],
                    "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
                    "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
                    "attention.layer_norm_epsilon": float(cfg.rms_norm_eps)})  # (llama.cpp asks for both)
    if arch in QWEN:
        nk, nv, dk, dv, K = cfg.linear_heads
        out = {"ssm.conv_kernel": K, "ssm.state_size": dk, "ssm.group_count": nk, "ssm.time_step_rank": nv,
               "ssm.inner_size": nv * dv, "attention.recurrent_layers": [t == "linear_attention" for t in types]}
        if arch != "qwen3next":
            out["rope.dimension_sections"] = [-(-(cfg.rotary_dim // 2 - k) // 3) for k in range(3)] + [0]
        #  (interleaved M-RoPE: pair s turns by stream s % 3 while within its section; Qwen3.5's 32 pairs: 11, 11, 10.
        #   For text the three streams are the same position, so only the coverage matters)
        if cfg.num_experts:
            out.update({"expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok,
                        "expert_feed_forward_length": cfg.moe_intermediate_size,
                        "expert_shared_feed_forward_length": cfg.shared_expert_intermediate_size})
    if arch in MLA:  # (run as one shared key head of the latent + the rotated key; the experts as DeepSeek's)
        ql, r, dr, dv = cfg.latent
        out = {"attention.head_count_kv": 1, "attention.key_length": r + dr, "attention.value_length": r,
               "attention.key_length_mla": cfg.head_dim, "attention.value_length_mla": dv,
               "attention.q_lora_rank": ql, "attention.kv_lora_rank": r, "rope.dimension_count": dr,
               "leading_dense_block_count": cfg.first_k_dense_replace, "expert_count": cfg.num_experts,
               "expert_used_count": cfg.num_experts_per_tok, "expert_feed_forward_length": cfg.moe_intermediate_size,
               "expert_shared_count": cfg.n_shared_experts, "expert_weights_scale": float(cfg.routed_scaling_factor),
               "expert_weights_norm": bool(cfg.norm_topk_prob), "expert_gating_func": 2 if cfg.router == "sigmoid"
               else 1}
        if 1 < cfg.n_group and cfg.topk_group < cfg.n_group:
            out.update({"expert_group_count": cfg.n_group, "expert_group_used_count": cfg.topk_group})
        s = cfg.rope_scaling or {}
        if s.get("rope_type") == "yarn":  # (llama.cpp's YaRN for deepseek2: mscale_all_dim by this key, x 0.1)
            out.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(s["factor"]),
                        "rope.scaling.original_context_length": s["original_max_position_embeddings"],
                        "rope.scaling.yarn_beta_fast": float(s.get("beta_fast") or 32),
                        "rope.scaling.yarn_beta_slow": float(s.get("beta_slow") or 1),
                        "rope.scaling.yarn_log_multiplier": 0.1 * float(s.get("mscale_all_dim") or 0)})
    return out


def table(cfg: Config) -> list:
    """(checkpoint name, GGUF name, transform) for every tensor this arch stores its own way (none for other archs)."""
    arch, rows = arch_of(cfg), []
    nemotron = arch in ("nemotron_h", "nemotron_h_moe")
    body = "backbone" if nemotron else "model"  # (checkpoint names)
    for i, t in enumerate(cfg.layer_types or [""] * cfg.num_hidden_layers):
        def add(hf, gg, how=None):
            rows.append((f"{body}.layers.{i}.{hf}", f"blk.{i}.{gg}", how))
        if arch == "lfm2" and t == "conv":
            add("conv.conv.weight", "shortconv.conv.weight", "conv")
            add("conv.in_proj.weight", "shortconv.in_proj.weight")
            add("conv.out_proj.weight", "shortconv.out_proj.weight")
        mixer = "mixer" if nemotron else "mamba" if arch == "granitehybrid" else None
        if mixer and t == "linear_attention":
            for hf, gg, how in (("in_proj.weight", "ssm_in.weight", None), ("conv1d.weight", "ssm_conv1d.weight",
                                "conv"), ("conv1d.bias", "ssm_conv1d.bias", None), ("dt_bias", "ssm_dt.bias", None),
                                ("A_log", "ssm_a", "a2"), ("D", "ssm_d", "col"), ("norm.weight", "ssm_norm.weight",
                                                                                 "groups"),
                                ("out_proj.weight", "ssm_out.weight", None)):
                add(f"{mixer}.{hf}", gg, how)
        if arch == "granitehybrid":  # the shared MLP's gate and up halves
            sh = "_shexp" if cfg.num_experts else ""
            add("shared_mlp.input_linear.weight", f"ffn_gate{sh}.weight", "half0")
            add("shared_mlp.input_linear.weight", f"ffn_up{sh}.weight", "half1")
            add("shared_mlp.output_linear.weight", f"ffn_down{sh}.weight")
        if nemotron and t == "moe":  # (Nemotron 3)
            for hf, gg in (("gate.weight", "ffn_gate_inp.weight"), ("gate.e_score_correction_bias",
                           "exp_probs_b.bias"), ("experts.up_proj.weight", "ffn_up_exps.weight"),
                           ("experts.down_proj.weight", "ffn_down_exps.weight"), ("fc1_latent_proj.weight",
                           "ffn_latent_down.weight"), ("fc2_latent_proj.weight", "ffn_latent_up.weight"),
                           ("shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
                           ("shared_experts.down_proj.weight", "ffn_down_shexp.weight")):
                add(f"mixer.{hf}", gg)
        if nemotron:  # (one norm per layer; the mixer's own tensors)
            add("norm.weight", "attn_norm.weight")
            if t == "full_attention":
                for p, gg in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
                    add(f"mixer.{p}_proj.weight", f"{gg}.weight")
            if t == "mlp":
                for p in ("up", "down"):
                    add(f"mixer.{p}_proj.weight", f"ffn_{p}.weight")
                    add(f"mixer.{p}_proj.bias", f"ffn_{p}.bias")
        if arch in MLA:
            for hf, gg, how in (("q_proj.weight", "attn_q.weight", "q_rope"), ("q_b_proj.weight", "attn_q_b.weight",
                                "q_rope"), ("kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight", "kv_rope"),
                                ("kv_b_proj.weight", "attn_k_b.weight", "k_b"),
                                ("kv_b_proj.weight", "attn_v_b.weight", "v_b"), ("q_a_proj.weight", "attn_q_a.weight",
                                                                                  None),
                                ("q_a_layernorm.weight", "attn_q_a_norm.weight", None),
                                ("kv_a_layernorm.weight", "attn_kv_a_norm.weight", None)):
                add(f"self_attn.{hf}", gg, how)
        if arch == "qwen3next":  # (its checkpoint's fused inputs: q, k, v of every head, and z; b and a as they are)
            add("post_attention_layernorm.weight", "post_attention_norm.weight", "norm")
            add("input_layernorm.weight", "attn_norm.weight", "norm")
            if t == "linear_attention":
                for hf, gg, how in (("in_proj_qkvz.weight", "attn_qkv.weight", "qkvz0"), ("in_proj_qkvz.weight",
                                    "attn_gate.weight", "qkvz1"), ("in_proj_ba.weight", "ssm_ba.weight", None),
                                    ("A_log", "ssm_a", "a1"), ("dt_bias", "ssm_dt.bias", None),
                                    ("conv1d.weight", "ssm_conv1d.weight", "conv"), ("norm.weight", "ssm_norm.weight",
                                                                                     None),
                                    ("out_proj.weight", "ssm_out.weight", None)):
                    add(f"linear_attn.{hf}", gg, how)
        if arch in ("qwen35", "qwen35moe"):
            add("post_attention_layernorm.weight", "post_attention_norm.weight", "norm")
            add("input_layernorm.weight", "attn_norm.weight", "norm")
            if t == "linear_attention":
                for hf, gg, how in (("in_proj_qkv.weight", "attn_qkv.weight", "qkv"), ("in_proj_z.weight",
                                    "attn_gate.weight", "v_rows"), ("in_proj_b.weight", "ssm_beta.weight", "v_heads"),
                                    ("in_proj_a.weight", "ssm_alpha.weight", "v_heads"), ("A_log", "ssm_a", "a1"),
                                    ("dt_bias", "ssm_dt.bias", "v_heads"), ("conv1d.weight", "ssm_conv1d.weight",
                                                                            "conv_qkv"),
                                    ("norm.weight", "ssm_norm.weight", None), ("out_proj.weight", "ssm_out.weight",
                                                                               "v_cols")):
                    add(f"linear_attn.{hf}", gg, how)
            if cfg.num_experts:
                add("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight")  # (kept [1, C])
    if nemotron:
        rows += [("backbone.embeddings.weight", "token_embd.weight", None), ("backbone.norm_f.weight",
                                                                           "output_norm.weight", None)]
    if arch == "lfm2":
        rows.append(("model.embedding_norm.weight", "token_embd_norm.weight", None))  # (llama.cpp's final norm)
    if arch in QWEN:
        rows.append(("model.norm.weight", "output_norm.weight", "norm"))
    return rows


def v_order(cfg: Config, t: torch.Tensor, dim: int, width: int, back=False) -> torch.Tensor:
    """Qwen3.5's value heads (nv = nk r, each `width` wide along `dim`) from HF's order (head g r + i: key head g's
    i-th) to ggml's (i nk + g) and back."""
    nk, nv = cfg.linear_heads[:2]
    if nk == nv or arch_of(cfg) == "qwen3next":  # (llama.cpp's qwen3next reads HF's order)
        return t
    r = nv // nk
    t = t.movedim(dim, 0)
    s = t.shape
    t = t.reshape(*((r, nk) if back else (nk, r)), width, *s[1:]).transpose(0, 1).reshape(s)
    return t.movedim(0, dim)


def rope_pairs(cfg: Config, t: torch.Tensor, start: int, width: int, back=False) -> torch.Tensor:
    """MLA's rotated rows [start, start + dr) of each `width` rows from halves (x_i, x_{i + dr/2}) to adjacent pairs
    (llama.cpp's rope), unless the checkpoint already rotates pairs (rope_interleave)."""
    dr = cfg.latent[2]
    if cfg.rope_interleaved:
        return t
    t = t.reshape(-1, width, *t.shape[1:]).clone()
    part = t[:, start: start + dr]
    shape = (part.shape[0], *((dr // 2, 2) if back else (2, dr // 2)), *part.shape[2:])
    t[:, start: start + dr] = part.reshape(shape).transpose(1, 2).reshape(part.shape)
    return t.reshape(-1, *t.shape[2:])


def transform(cfg: Config, t: torch.Tensor, how, back=False) -> torch.Tensor:
    """A checkpoint tensor -> its GGUF form (back: the inverse; kv_b's halves: kv_b)."""
    if how in ("q_rope", "kv_rope"):
        ql, r, dr, dv = cfg.latent
        return rope_pairs(cfg, t, cfg.head_dim - dr, cfg.head_dim, back) if how == "q_rope" else rope_pairs(
            cfg, t, r, r + dr, back)
    if how in ("k_b", "v_b"):
        H, dn, dv = cfg.num_attention_heads, cfg.head_dim - cfg.latent[2], cfg.latent[3]
        if back:  # t: {"k_b": [H, r, dn], "v_b": [H, dv, r]} -> [H (dn + dv), r]
            return torch.cat([t["k_b"].transpose(1, 2), t["v_b"]], 1).reshape(H * (dn + dv), -1)
        k, v = t.reshape(H, dn + dv, -1).split([dn, dv], 1)
        return k.transpose(1, 2).contiguous() if how == "k_b" else v.contiguous()
    nk, nv, dk, dv = cfg.linear_heads[:4] if cfg.linear_heads else (1, 1, 1, 1)
    if how in ("conv", "conv_qkv"):
        if how == "conv_qkv":  # (the value rows regrouped)
            q, v = t.split([2 * nk * dk, nv * dv], 0)
            t = torch.cat([q, v_order(cfg, v, 0, dv, back)], 0)
        return t[:, None] if back else t.squeeze(1)
    if how in ("a1", "a2"):
        if back:
            return v_order(cfg, torch.log(-t.reshape(-1)), 0, 1, True) if how == "a1" else torch.log(-t.reshape(-1))
        a = -torch.exp(t)
        return v_order(cfg, a, 0, 1) if how == "a1" else a.reshape(-1, 1)
    if how == "col":
        return t.reshape(-1) if back else t.reshape(-1, 1)
    if how == "groups":
        return t.reshape(-1) if back else t.reshape(cfg.ssm[2], -1)
    if how == "norm":  # (Qwen3.5's zero-centred norms: llama.cpp multiplies by the weight itself)
        return t - 1 if back else t + 1
    if how == "qkv":
        q, v = t.split([2 * nk * dk, nv * dv], 0)
        return torch.cat([q, v_order(cfg, v, 0, dv, back)], 0)
    if how in ("v_rows", "v_heads", "v_cols"):
        return v_order(cfg, t, 1 if how == "v_cols" else 0, dv if how != "v_heads" else 1, back)
    return t


def to_gguf(cfg: Config, name: str, t: torch.Tensor) -> list:
    """A checkpoint tensor this arch stores its own way -> [(GGUF name, tensor)] (two for a split)."""
    out = []
    for hf, gg, how in table(cfg):
        if hf == name and how in ("qkvz0", "qkvz1"):  # (the fused rows back in q k v | z order, then split)
            x = fused_order(cfg, "in_proj_qkvz", t).split(fused_sizes(cfg, "in_proj_qkvz", len(t)))[int(how[-1])]
            out.append((gg, x))
        elif hf == name:
            x = t.chunk(2, 0)[int(how[-1])] if how in ("half0", "half1") else transform(cfg, t, how)
            out.append((gg, x))
    return out


def pair(cfg: Config, pending: dict, hf: str, how, w):
    """Reading back: kv_b_proj once both its halves have been read (else None); any other tensor as it is."""
    if how not in ("k_b", "v_b"):
        return transform(cfg, w, how, back=True)
    pending.setdefault(hf, {})[how] = w
    return transform(cfg, pending.pop(hf), how, back=True) if len(pending[hf]) == 2 else None


def from_gguf(cfg: Config) -> dict:
    """GGUF name -> (the name formats.load_tensors takes, the inverse transform) for the tensors of `table`."""
    back = {}
    for hf, gg, how in table(cfg):
        if how in ("half0", "half1"):  # (nanotune's own halves of the shared MLP)
            hf = hf.replace("input_linear.weight", "gate_proj.weight" if how == "half0" else "up_proj.weight")
        if how in ("qkvz0", "qkvz1"):  # (and of Qwen3-Next's fused inputs)
            hf = hf.replace("in_proj_qkvz", "in_proj_qkv" if how == "qkvz0" else "in_proj_z")
        if hf.endswith((".experts.up_proj.weight", ".experts.down_proj.weight")):  # (Nemotron 3's stacks: nanotune's
            hf = hf.replace("up_proj.weight", "gate_up_proj").replace("down_proj.weight", "down_proj")  # own names)
        back[gg] = (hf, how if how not in ("half0", "half1", "qkvz0", "qkvz1") else None)
    return back


def config(arch: str, g, names: set) -> dict:
    """config.json keys from a GGUF's metadata (g: a key under the arch -> value): the inverse of `keys`."""
    kv = g("attention.head_count_kv")
    kv = kv if isinstance(kv, list) else [kv] * g("block_count")
    heads = max(kv) or g("attention.head_count")
    if arch == "lfm2":
        return {"layer_types": ["full_attention" if k else "conv" for k in kv], "num_key_value_heads": heads,
                "conv_L_cache": g("shortconv.l_cache"), "block_auto_adjust_ff_dim": False,
                "tie_word_embeddings": "output.weight" not in names}
    if arch in QWEN:
        nv = g("ssm.time_step_rank")
        d = {"layer_types": ["linear_attention" if r else "full_attention" for r in g("attention.recurrent_layers")],
             "linear_num_key_heads": g("ssm.group_count"), "linear_num_value_heads": nv,
             "linear_key_head_dim": g("ssm.state_size"), "linear_value_head_dim": g("ssm.inner_size") // nv,
             "linear_conv_kernel_dim": g("ssm.conv_kernel"), "num_key_value_heads": heads}
        if g("expert_count"):
            d.update(num_experts=g("expert_count"), num_experts_per_tok=g("expert_used_count"),
                     moe_intermediate_size=g("expert_feed_forward_length"),
                     shared_expert_intermediate_size=g("expert_shared_feed_forward_length"))
        return d
    if arch in MLA:
        ql, r, dr = g("attention.q_lora_rank"), g("attention.kv_lora_rank"), g("rope.dimension_count")
        d = {"q_lora_rank": ql or None, "kv_lora_rank": r, "qk_rope_head_dim": dr, "v_head_dim": g(
            "attention.value_length_mla"), "qk_nope_head_dim": g("attention.key_length_mla") - dr,
            "num_key_value_heads": g("attention.head_count"), "head_dim": g("attention.key_length_mla"),
            "rope_interleave": True, "partial_rotary_factor": dr / g("attention.key_length_mla"),
            "n_routed_experts": g("expert_count"), "num_experts_per_tok": g("expert_used_count"),
            "moe_intermediate_size": g("expert_feed_forward_length"), "n_shared_experts": g("expert_shared_count"),
            "first_k_dense_replace": g("leading_dense_block_count"), "routed_scaling_factor": g(
                "expert_weights_scale"), "norm_topk_prob": bool(g("expert_weights_norm")),
            "n_group": g("expert_group_count", 1), "topk_group": g("expert_group_used_count", 1)}
        if g("rope.scaling.type") == "yarn":
            m = g("rope.scaling.yarn_log_multiplier") / 0.1
            d["rope_scaling"] = {"rope_type": "yarn", "mscale": m, "mscale_all_dim": m, "factor": g(
                "rope.scaling.factor"), "original_max_position_embeddings": g("rope.scaling.original_context_length"),
                "beta_fast": g("rope.scaling.yarn_beta_fast"), "beta_slow": g("rope.scaling.yarn_beta_slow")}
            d["rope_parameters"] = {"rope_theta": g("rope.freq_base"), **d["rope_scaling"]}
            if beta := g("attention.temperature_scale"):  # (Mistral 4's query temperature, as Ministral 3's)
                d["rope_parameters"].update(llama_4_scaling_beta=beta, original_max_position_embeddings=g(
                    "attention.temperature_length"))
        return d
    nh, G = g("ssm.time_step_rank"), g("ssm.group_count")
    nemotron = arch in ("nemotron_h", "nemotron_h_moe")
    ssm = {"mamba_num_heads" if nemotron else "mamba_n_heads": nh, "ssm_state_size" if nemotron else "mamba_d_state":
           g("ssm.state_size")}
    if arch in ("nemotron_h", "nemotron_h_moe"):
        ff, E = g("feed_forward_length"), g("expert_count", 0)
        types = ["full_attention" if k else ("moe" if E else "mlp") if f else "linear_attention"
                 for k, f in zip(kv, ff)]
        moe = {"n_routed_experts": E, "num_experts_per_tok": g("expert_used_count"), "moe_intermediate_size": g(
            "expert_feed_forward_length"), "moe_shared_expert_intermediate_size": g(
            "expert_shared_feed_forward_length"),
            "norm_topk_prob": bool(g("expert_weights_norm")), "routed_scaling_factor": g("expert_weights_scale"),
            "n_group": g("expert_group_count", 1), "topk_group": g("expert_group_used_count", 1),
            "moe_latent_size": g("moe_latent_size") or None} if E else {}
        return {**ssm, **moe, "layers_block_type": types, "mamba_head_dim": g("ssm.inner_size") // nh, "n_groups": G,
                "conv_kernel": g("ssm.conv_kernel"), "num_key_value_heads": heads, "intermediate_size": max(ff),
                "use_conv_bias": "blk.0.ssm_conv1d.bias" in names or any(".ssm_conv1d.bias" in n for n in names),
                "mlp_bias": any(n.endswith("ffn_up.bias") for n in names), "head_dim": g("attention.key_length"),
                "layer_norm_epsilon": g("attention.layer_norm_rms_epsilon")}
    E = g("expert_count", 0)
    return {**ssm, "layer_types": ["full_attention" if k else "linear_attention" for k in kv],
            "mamba_d_head": g("ssm.inner_size") // nh, "mamba_n_groups": G, "mamba_d_conv": g("ssm.conv_kernel"),
            "mamba_expand": g("ssm.inner_size") // g("embedding_length"), "num_key_value_heads": heads,
            "mamba_conv_bias": any(".ssm_conv1d.bias" in n for n in names), "num_local_experts": E,
            "num_experts_per_tok": g("expert_used_count") if E else 1, "shared_intermediate_size": g(
                "expert_shared_feed_forward_length") or g("feed_forward_length"),
            "intermediate_size": g("feed_forward_length"), "embedding_multiplier": g("embedding_scale", 1.0),
            "residual_multiplier": g("residual_scale", 1.0), "attention_multiplier": g("attention.scale"),
            "logits_scaling": g("logit_scale", 1.0),
            "position_embedding_type": "rope" if g("rope.scaling.finetuned", True) else None}
