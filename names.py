"""nanotune names: tensor and module names between a checkpoint (its family's own), nanotune (Llama's) and
transformers 5's model in memory (what PEFT adapts); the layouts on disk that differ from nanotune's: stacked
experts, llama.cpp's Q/K rows for adjacent-pair RoPE, Apertus's xIELU parameters as GGUF metadata. families.py
holds the table these read (Family.renames, .converted, .experts, .mtp)."""
import re
from functools import partial

import torch

from cli import NanotuneError
from families import FAMILIES
from model import Config


# ---------------------------------------------------------------------------------------------
# Tensor names: nanotune keeps Llama's names for every family; a checkpoint may use its own
VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
          "model.embed_vision.", "model.audio_tower.", "model.embed_audio.", "model.visual.")  # (Gemma 4's, Qwen3.5's)
TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."))  # Gemma 3 vision-language: the text tower's names


def nanotune_name(cfg: Config, name: str) -> str | None:
    """A checkpoint tensor name, module name or bare LoRA target -> nanotune's (None: a vision-tower tensor)."""
    if name.startswith(VISION):
        return None
    for old, new in TEXT_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
    fam = FAMILIES[cfg.model_type]
    if fam.mtp and (m := LAYER.match(name)) and int(m.group(1)) >= cfg.num_hidden_layers:
        return None  # a multi-token-prediction layer: nanotune trains the model's own layers only
    return _rename(name, {**fam.renames, **fam.memory})  # (a PEFT adapter's names are the in-memory ones)


def checkpoint_name(cfg: Config, name: str) -> str:
    """nanotune's tensor name, module name or LoRA target -> the family checkpoint's (Phi-2: o_proj -> dense)."""
    return _rename(name, {v: k for k, v in FAMILIES[cfg.model_type].renames.items()})


def memory_name(cfg: Config, name: str) -> str:
    """nanotune's module name -> transformers 5's in-memory one (what PEFT adapts): the checkpoint's, but for the
    components transformers renames at load (Mixtral's block_sparse_moe is mlp in memory)."""
    fam = FAMILIES[cfg.model_type]
    return _rename(name, {v: k for k, v in {**fam.renames, **fam.memory}.items() if k not in fam.converted})


LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _rename(name: str, renames: dict) -> str:
    """Each name component through `renames`; a dotted key renames that run of components (GLM-4.5's
    gate.e_score_correction_bias, the MoE block's own in nanotune)."""
    single = {}
    for old, new in renames.items():
        if "." in old or "." in new:
            name = f".{name}.".replace(f".{old}.", f".{new}.")[1:-1]
        else:
            single[old] = new
    return ".".join(single.get(part, part) for part in name.split("."))


# gpt-oss stores its stacked experts input-major, gate and up columns interleaved: gate_up_proj [E, C, 2I] with
# gate = [..., 0::2], up = [..., 1::2], down_proj [E, I, C] (used as x @ W + b). nanotune keeps every family's
# experts as transformers' Mixtral: gate_up_proj [E, 2I, C] gate rows first, down_proj [E, C, I].
def experts_from_checkpoint(cfg: Config, name: str, t):
    """A checkpoint's stacked expert tensor (nanotune's name by now) -> nanotune's layout."""
    if FAMILIES[cfg.model_type].experts == "transposed" and name.endswith(STACKED):  # Llama 4: [E, in, out]
        return t.transpose(1, 2).contiguous()
    if FAMILIES[cfg.model_type].experts != "input_major" or ".experts." not in name:
        return t
    if name.endswith("gate_up_proj_bias"):  # [E, 2I] interleaved -> gate half, up half
        return torch.cat([t[:, 0::2], t[:, 1::2]], 1)
    if name.endswith("gate_up_proj"):
        t = t.transpose(1, 2)  # [E, 2I, C], rows interleaved
        return torch.cat([t[:, 0::2], t[:, 1::2]], 1).contiguous()
    return t.transpose(1, 2).contiguous() if name.endswith("down_proj") else t


def gate_up_rows(cfg: Config, B, inverse=False):
    """gate_up's per-expert LoRA B [E, 2I, r] (nanotune's rows: gate, then up) in the checkpoint's row order
    (gpt-oss: interleaved, as PEFT adapts its input-major gate_up_proj); inverse: back."""
    if FAMILIES[cfg.model_type].experts != "input_major":
        return B
    if inverse:
        return torch.cat([B[:, 0::2], B[:, 1::2]], 1)
    return torch.stack(B.chunk(2, 1), 2).flatten(1, 2)


def adapter_names(cfg: Config, saving: bool) -> dict:
    """lora.save_adapter's / load_adapter's rename, gate_up_rows and fused for this family's checkpoint names."""
    swap = FAMILIES[cfg.model_type].experts == "transposed"  # (peft takes Llama 4's [E, in, out] for [E, out, in])
    if saving:
        return dict(rename=partial(memory_name, cfg), gate_up_rows=partial(gate_up_rows, cfg), swap=swap,
                    fused=partial(fuse_adapters, cfg))
    return dict(rename=partial(nanotune_name, cfg), gate_up_rows=partial(gate_up_rows, cfg, inverse=True), swap=swap,
                fused=partial(split_adapters, cfg), fused_targets=partial(split_targets, cfg))


# Projections a checkpoint stores fused (cfg.fused_checkpoint): q/k/v (Phi-3, MPT, Falcon), gate/up (Phi-3, GLM-4),
# Qwen3-Next's linear attention inputs
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
         "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"), "in_proj_ba": ("in_proj_b", "in_proj_a")}


def fused_sizes(cfg: Config, fused: str, rows: int) -> list:
    """Each part's rows, of the fused projection's `rows` (gate / up: halves, a shared MLP's too)."""
    H, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if fused in ("in_proj_qkvz", "in_proj_ba"):
        nk, nv, dk, dv = cfg.linear_heads[:4]
        return [2 * nk * dk + nv * dv, nv * dv] if fused == "in_proj_qkvz" else [nv, nv]
    return [H * d, kv * d, kv * d] if fused == "qkv_proj" else [rows // 2] * 2


def fuse_adapters(cfg: Config, layers: list) -> list:
    """nanotune's LoRA on the parts of a fused checkpoint projection -> PEFT's on the fused one (which is all PEFT
    sees): [(name, A, B, magnitude)] -> the same with A = [A_1; ..; A_k] (rank k r), B = blockdiag(B_1 .. B_k)
    in the checkpoint's row order, magnitudes concatenated. Exact: row block i of B A is B_i A_i; a part without
    an adapter has zero rows (its DoRA magnitude is unknown here: refused)."""
    out, groups = [], {}
    for n, A, B, mag in layers:
        parent, _, proj = n.rpartition(".")
        fused = next((f for f, parts in FUSED.items() if proj in parts and f in cfg.fused_checkpoint), None)
        if fused is None:
            out.append((n, A, B, mag))
        else:
            groups.setdefault((parent, fused), {})[proj] = (A, B, mag)
    for (parent, fused), got in groups.items():
        if any(m is not None for _, _, m in got.values()) and len(got) < len(FUSED[fused]):
            raise NanotuneError(f"DoRA on some of {', '.join(FUSED[fused])} only: the checkpoint fuses them into "
                                f"{fused}, where PEFT needs every part's magnitude; target all of them or none.")
        As = [got[p][0] for p in FUSED[fused] if p in got]
        sizes = fused_sizes(cfg, fused, 2 * next(iter(got.values()))[1].shape[0])  # (the rows only gate / up need)
        Bf, row, col = As[0].new_zeros(sum(sizes), sum(a.shape[0] for a in As)), 0, 0
        for p, size in zip(FUSED[fused], sizes):
            if p in got:
                Bf[row: row + size, col: col + got[p][0].shape[0]] = got[p][1]
                col += got[p][0].shape[0]
            row += size
        Bf = fused_order(cfg, fused, Bf, back=True)
        mags = [got[p][2] for p in FUSED[fused] if p in got and got[p][2] is not None]
        out.append((f"{parent}.{fused}", torch.cat(As), Bf, torch.cat(mags) if mags else None))
    return out


def split_targets(cfg: Config, targets: list, patterns: dict) -> tuple:
    """PEFT's targets and {name: (rank, alpha)} (nanotune's names) -> the same with each fused projection's parts
    in its place, each with the fused one's rank and alpha (split_adapters gives each the whole A)."""
    out, parts = [], {}
    for t in targets:
        stem, _, f = t.rpartition(".")  # (a dotted target too: Granite 4.0-H's shared_mlp.input_linear)
        if f in FUSED and f in cfg.fused_checkpoint:
            out += [f"{stem}.{p}" if stem else p for p in FUSED[f]]
            parts.update({p: patterns[t] for p in FUSED[f] if t in patterns})
        else:
            out.append(t)
    return out, {**{k: v for k, v in patterns.items() if k not in FUSED}, **parts}


def split_adapters(cfg: Config, sd: dict) -> dict:
    """The inverse, for a PEFT adapter on a fused projection ({nanotune-named key: tensor}): each part gets the whole
    A (rank R) and its rows of B (so B_i A = the fused update's rows i), and its magnitude rows."""
    out = {}
    for k, v in sd.items():
        stem, _, leaf = k.rpartition(".lora_")
        parent, _, fused = stem.rpartition(".")
        if fused not in FUSED or fused not in cfg.fused_checkpoint:
            out[k] = v
            continue
        if leaf.startswith("B") or leaf.startswith("magnitude"):
            parts = fused_order(cfg, fused, v).split(fused_sizes(cfg, fused, v.shape[0]))
        else:
            parts = [v] * len(FUSED[fused])
        out.update({f"{parent}.{p}.lora_{leaf}": t for p, t in zip(FUSED[fused], parts)})
    return out


def experts_to_checkpoint(cfg: Config, name: str, t):
    """The inverse of experts_from_checkpoint."""
    if FAMILIES[cfg.model_type].experts == "transposed" and name.endswith(STACKED):
        return t.transpose(1, 2).contiguous()
    if FAMILIES[cfg.model_type].experts != "input_major" or ".experts." not in name:
        return t
    if name.endswith("gate_up_proj_bias"):
        return torch.stack(t.chunk(2, 1), -1).flatten(1)
    if name.endswith("gate_up_proj"):  # [E, 2I, C] -> rows interleaved -> [E, C, 2I]
        g, u = t.chunk(2, 1)
        return torch.stack([g, u], 2).flatten(1, 2).transpose(1, 2).contiguous()
    return t.transpose(1, 2).contiguous() if name.endswith("down_proj") else t


# Stacked experts: a checkpoint stores them per expert (the hub), per projection (GGUF) or stacked (gpt-oss)
EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
GGUF_EXPERTS = re.compile(r"(.*\.experts)\.(gate_proj|up_proj|down_proj)\.weight")  # stacked per projection
GGUF_EXPERT_BIAS = re.compile(r"(.*\.experts)\.(gate_proj|up_proj|down_proj)\.bias")
STACKED = (".experts.gate_up_proj", ".experts.down_proj")


def stack_experts(cfg: Config, tensors):
    """Per-expert tensors (nanotune names by now) -> the stacked gate_up_proj [E, 2I, C] and down_proj [E, C, I],
    each layer's emitted once all its E experts have passed (one layer's experts are the most ever held)."""
    pending = {}
    for name, t in tensors:
        m = EXPERT.fullmatch(name)
        if m is None:
            yield name, t
            continue
        base, e, proj = m.groups()
        parts = pending.setdefault(base, {})
        parts[proj, int(e)] = t
        if len(parts) == (3 if cfg.gated_mlp else 2) * cfg.num_experts:  # (Nemotron-H's: up and down only)
            stack = lambda p: torch.stack([parts[p, i] for i in range(cfg.num_experts)])  # noqa: E731
            yield f"{base}.gate_up_proj", torch.cat([stack("gate_proj"), stack("up_proj")], dim=1) if \
                cfg.gated_mlp else stack("up_proj")
            yield f"{base}.down_proj", stack("down_proj")
            del pending[base]


def unstack_experts(cfg: Config, name: str, t: torch.Tensor, per_expert=True):
    """The inverse of stack_experts for one stacked tensor (or gpt-oss's stacked bias), under the checkpoint's names:
    per expert (the hub's layout), or one [E, out, (in)] stack per projection (GGUF's), gate_up split in two."""
    base, leaf = name.rsplit(".", 1)
    end = "bias" if leaf.endswith("_bias") else "weight"
    parts = [("down_proj", t)] if not leaf.startswith("gate_up") else zip(("gate_proj", "up_proj"), t.chunk(
        2, dim=1)) if cfg.gated_mlp else [("up_proj", t)]
    for proj, part in parts:
        names = [f"{base}.{e}.{proj}.{end}" for e in range(len(part))] if per_expert else [f"{base}.{proj}.{end}"]
        yield from zip((checkpoint_name(cfg, n) for n in names), part if per_expert else [part])


def qk_permute(w: torch.Tensor, heads: int, inverse=False) -> torch.Tensor:
    """llama.cpp's `llama` rope rotates adjacent pairs (x[2i], x[2i+1]); HF rotates halves (x[i], x[i+d/2]).
    Export interleaves the halves of each head: new row 2i+j = old row j*(d/2)+i. `inverse` undoes it."""
    shape = w.shape
    d = shape[0] // heads
    if inverse:
        return w.reshape(heads, d // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return w.reshape(heads, 2, d // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def permuted_heads(cfg: Config, name: str):
    """How many heads a Q/K tensor has when llama.cpp's `llama` arch wants its rows permuted, else None."""
    if FAMILIES[cfg.model_type].gguf_arch not in ("llama", "granite", "granitemoe", "arcee", "smollm3", "mistral3",
                                                  "granitehybrid"):
        return None
    return cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads if ".k_proj." in name else None


def qkv_groups(cfg: Config, t: torch.Tensor, back=False) -> torch.Tensor:
    """Falcon's fused q/k/v (weight or bias), stored per kv group [q_1 .. q_g, k, v] -> contiguous [q; k; v], the
    layout of Phi-3's and of llama.cpp's falcon (back: the inverse)."""
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    return group_major(t, kv, [cfg.num_attention_heads // kv * d, d, d], back)


def group_major(t: torch.Tensor, G: int, sizes: list, back=False) -> torch.Tensor:
    """Rows stored per group, [part_1 .. part_n] G times -> each part's rows of every group together (back: the
    inverse); sizes: each part's rows in one group."""
    rest = t.shape[1:]
    if back:
        parts = t.split([G * s for s in sizes])
        return torch.cat([p.reshape(G, s, *rest) for p, s in zip(parts, sizes)], 1).reshape(t.shape)
    return torch.cat([x.reshape(-1, *rest) for x in t.reshape(G, sum(sizes), *rest).split(sizes, 1)])


def fused_order(cfg: Config, fused: str, t: torch.Tensor, back=False) -> torch.Tensor:
    """A fused projection's rows (weight, bias, LoRA B, DoRA magnitude) in the checkpoint's order -> its parts'
    concatenated (back: the inverse): Falcon's q/k/v and Qwen3-Next's qkvz / ba are stored per group of heads."""
    if fused == "qkv_proj" and cfg.qkv_grouped:
        return qkv_groups(cfg, t, back)
    if fused in ("in_proj_qkvz", "in_proj_ba"):
        nk, nv, dk, dv = cfg.linear_heads[:4]
        r = nv // nk
        return group_major(t, nk, [dk, dk, r * dv, r * dv] if fused == "in_proj_qkvz" else [r, r], back)
    return t


XIELU = ("alpha_p", "alpha_n", "beta", "eps")  # Apertus: llama.cpp keeps them as metadata arrays, one value per layer


def xielu_arrays(cfg: Config, tensors) -> dict:
    """The xIELU parameters of every layer (from a stream of (name, tensor)) -> {GGUF key: [value per layer]}."""
    v = {n: float(t) for n, t in tensors if ".act_fn." in n}
    return {f"xielu.{p}": [v[f"model.layers.{i}.mlp.act_fn.{p}"] for i in range(cfg.num_hidden_layers)] for p in XIELU}


def xielu_tensors(meta: dict):
    """The inverse of xielu_arrays, from a GGUF's metadata: (name, tensor) per layer and parameter."""
    for p in XIELU if "xielu.alpha_p" in meta else ():
        for i, x in enumerate(meta[f"xielu.{p}"]):
            yield f"model.layers.{i}.mlp.act_fn.{p}", torch.tensor([x] if p.startswith("alpha") else x)


def pair_expert_biases(pending: dict, base: str, proj: str, x: torch.Tensor):
    """gpt-oss: GGUF's per-projection expert biases [E, out] -> down_proj_bias, and gate_up_proj_bias (gate half
    first, nanotune's layout) once both halves have passed."""
    if proj == "down_proj":
        yield f"{base}.down_proj_bias", x
        return
    pending[base, proj] = x
    if (base, "gate_proj") in pending and (base, "up_proj") in pending:
        gate, up = pending.pop((base, "gate_proj")), pending.pop((base, "up_proj"))
        yield f"{base}.gate_up_proj_bias", torch.cat([gate, up], 1)


# ---------------------------------------------------------------------------------------------
# Gemma 4 in llama.cpp (its gemma4 arch): the per-layer-input tensors, the router's two scales, the full layers'
# head size as key_length and the sliding ones' as *_swa, per-layer KV heads and MLP widths as arrays, proportional
# RoPE as rope_freqs divisors (formats.gguf_out_tensors; 1e30 leaves a pair unrotated)
GEMMA4_GGUF_TOP = {"model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
                   "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
                   "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight"}
GEMMA4_GGUF = {"per_layer_input_gate.weight": "inp_gate.weight", "per_layer_projection.weight": "proj.weight",
               "post_per_layer_input_norm.weight": "post_norm.weight", "layer_scalar": "layer_output_scale.weight",
               "router.proj.weight": "ffn_gate_inp.weight", "router.scale": "ffn_gate_inp.scale",
               "router.per_expert_scale": "ffn_down_exps.scale",
               **{f"experts.{p}_proj.weight": f"ffn_{p}_exps.weight" for p in ("gate", "up", "down")},
               **{f"{hf}.weight": f"{gg}.weight" for hf, gg in (("pre_feedforward_layernorm_2", "pre_ffw_norm_2"),
                                                                ("post_feedforward_layernorm_1", "post_ffw_norm_1"),
                                                                ("post_feedforward_layernorm_2", "post_ffw_norm_2"))}}


def gemma4_gguf_names(cfg: Config) -> dict:
    return {**GEMMA4_GGUF_TOP, **{f"model.layers.{i}.{hf}": f"blk.{i}.{gg}" for i in range(cfg.num_hidden_layers)
                                  for hf, gg in GEMMA4_GGUF.items()}}


def gemma4_gguf_keys(cfg: Config) -> dict:
    """GGUF keys (under the arch) that llama.cpp's gemma4 reads, as written by its converter."""
    L, hd, first_shared = cfg.num_hidden_layers, cfg.head_dim, cfg.num_hidden_layers - cfg.num_kv_shared_layers
    wide = cfg.global_head_dim or hd
    double = [2 if cfg.use_double_wide_mlp and i >= first_shared else 1 for i in range(L)]
    keys = {"feed_forward_length": [cfg.intermediate_size * n for n in double],
            "attention.head_count_kv": [cfg.kv_heads_at(i) for i in range(L)],
            "attention.key_length": wide, "attention.value_length": wide, "rope.dimension_count": wide,
            "attention.key_length_swa": hd, "attention.value_length_swa": hd, "rope.dimension_count_swa": hd,
            "attention.shared_kv_layers": cfg.num_kv_shared_layers, "attention.sliding_window": cfg.sliding_window,
            "embedding_length_per_layer_input": cfg.hidden_size_per_layer_input or 0,
            "final_logit_softcapping": float(cfg.final_logit_softcapping or 0.0)}  # (absent, llama.cpp caps at 30)
    if cfg.moe_block:
        keys.update({"expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok,
                     "expert_feed_forward_length": cfg.moe_intermediate_size})
    return keys


def gemma4_from_gguf(g, names: set, freqs) -> dict:
    """The inverse of gemma4_gguf_keys (g: a key under the arch -> value; freqs: rope_freqs' values) as
    config.json keys."""
    types = ["sliding_attention" if s else "full_attention" for s in g("attention.sliding_window_pattern")]
    full = types.index("full_attention") if "full_attention" in types else 0
    width, kv = g("feed_forward_length"), g("attention.head_count_kv")
    width, kv = (width if isinstance(width, list) else [width]), (kv if isinstance(kv, list) else [kv] * len(types))
    sliding_kv = kv[types.index("sliding_attention")]
    wide, rotated = g("attention.key_length"), sum(f < 1e29 for f in freqs)
    scale = {} if not rotated or freqs[0] == 1.0 else {"factor": float(freqs[0])}
    d = {"layer_types": types, "head_dim": g("attention.key_length_swa"), "global_head_dim": wide,
         "num_key_value_heads": sliding_kv, "intermediate_size": width[0], "use_double_wide_mlp": width[-1] != width[0],
         "attention_k_eq_v": f"blk.{full}.attn_v.weight" not in names and types[full] == "full_attention",
         "num_kv_shared_layers": g("attention.shared_kv_layers", 0), "sliding_window": g("attention.sliding_window"),
         "hidden_size_per_layer_input": g("embedding_length_per_layer_input"),
         "final_logit_softcapping": g("final_logit_softcapping") or None,
         "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": g("rope.freq_base_swa", 1e4)},
                             "full_attention": {"rope_type": "proportional", "rope_theta": g("rope.freq_base"),
                                                "partial_rotary_factor": 2 * rotated / wide, **scale}}}
    if d["attention_k_eq_v"]:
        d["num_global_key_value_heads"] = kv[full]
    if g("expert_count"):
        d.update(enable_moe_block=True, num_experts=g("expert_count"), top_k_experts=g("expert_used_count"),
                 moe_intermediate_size=g("expert_feed_forward_length"))
    return d
