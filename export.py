"""nanotune export: a training run (or any model + adapter) -> what people deploy.

    python export.py --run out --format merged                 # HF directory, LoRA folded in (bf16)
    python export.py --run out --format adapter --dtype float16
    python export.py --run out --format gguf --quant q8_0 --ollama      # each export is reloaded and checked
                                                                       # (--no_verify skips that)
    python export.py --model ./Qwen2.5-0.5B --adapter out/adapter --format gguf --quant q4_k_m

GGUF is written by nanotune itself through the `gguf` package (no llama.cpp scripts or binaries):
llama.cpp's tensor names, Q/K row permutation for `llama`, Gemma's norm + 1, Llama 3.1's rope_freqs,
fused Phi-3 tensors, and the tokenizer (gpt2 BPE with merges, or SentencePiece with scores).
f32/f16/bf16/q8_0/q4_0/q4_1/q5_0/q5_1 are quantized by `gguf`; k-quants (q4_k_m, ...) go through
llama-cpp-python's llama_model_quantize when it is installed. Tensors are merged, converted and
written one at a time; every output goes to a temp name first and is renamed when complete.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys

import torch
import torch.nn.functional as F

import formats
import gguf_mixers
import ggufread
import lora
from families import GGUF_LEADING_DENSE, GGUF_NORM_TOPK
from names import adapter_names
import quant
from cli import NanotuneError, Parser, cli, fresh_tmp, publish, quiet, writing
from formats import BLOCK_TYPES, FLOAT_TYPES, load_model, load_tokenizer, resolve_model_path
from tokenizer import chat_turns, ollama_stops, ollama_template

K_QUANTS = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16,
            "q5_k_m": 17, "q6_k": 18}  # llama.cpp's ftype numbers
QUANTS = [*FLOAT_TYPES, *BLOCK_TYPES, *K_QUANTS]


# ---------------------------------------------------------------------------------------------
# Dense tensors, one at a time
def finite(name, t, dtype):
    """(name, tensor) about to be written, refused when casting made it inf / NaN (past float16's 65504)."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise NanotuneError(f"{name} holds values that {str(dtype).removeprefix('torch.')} cannot represent (they "
                            "became inf); export with --dtype bfloat16 or float32 instead.")
    return name, t


def expert_biases(prefix, experts):
    """gpt-oss: the experts' biases, beside their stacked weights."""
    return ((prefix + n, p.detach()) for n, p in experts.named_parameters(recurse=False) if n.endswith("_bias"))


def dense_tensors(model, unstack=True):
    """(HF name, tensor) for every weight with LoRA folded in and 4-bit bases dequantized, in the
    checkpoint's own layout (Phi-3 fused; experts per expert, or stacked per projection for GGUF when
    `unstack` is False). Only one merged tensor exists at a time."""
    def walk(prefix, mod):
        if isinstance(mod, lora.LoRALinear):
            yield prefix + "weight", mod.merged_weight()
            if mod.base.bias is not None:
                yield prefix + "bias", mod.base.bias.detach()
            return
        if isinstance(mod, lora.LoRAExperts):  # stacked [E, ...] weights (formats.fuse unstacks them)
            yield from ((prefix + p, mod.merged_weight(p)) for p in mod.base.shapes)
            yield from expert_biases(prefix, mod.base)
            return
        if isinstance(mod, quant.QuantExperts):
            yield from ((prefix + p, mod.dense(p, torch.float32)) for p in mod.shapes)
            yield from expert_biases(prefix, mod)
            return
        if isinstance(mod, quant.Linear4bit):
            yield prefix + "weight", mod.dense_weight(torch.float32)
            if mod.bias is not None:
                yield prefix + "bias", mod.bias.detach()
            return
        for n, p in mod.named_parameters(recurse=False):
            yield prefix + n, p.detach()
        for n, child in mod.named_children():
            yield from walk(f"{prefix}{n}.", child)

    return formats.fuse(model.config, walk("", model), unstack)


# ---------------------------------------------------------------------------------------------
# Merged HF directory and PEFT adapter
# What each format writes: --overwrite replaces only an earlier nanotune result, never a directory or file of the
# user's that happens to be at --out (it would be deleted).
OURS = {"merged": ("config.json", re.compile(r"(generation_)?config\.json|tokenizer(_config)?\.json"
                                            r"|chat_template\.jinja|model(-\d{5}-of-\d{5})?\.safetensors"
                                            r"|model\.safetensors\.index\.json")),
        "adapter": ("adapter_config.json", re.compile(r"adapter_(config\.json|model\.safetensors)|tokenizer(_config)?"
                                                      r"\.json|chat_template\.jinja"))}


def check_replaceable(out, fmt):
    """Refuse, in one sentence, to replace `out` unless it is a previous nanotune export of format `fmt`."""
    if fmt == "gguf":
        with open(out, "rb") if os.path.isfile(out) and not os.path.islink(out) else contextlib.nullcontext() as f:
            if f is not None and f.read(4) == b"GGUF":
                return
        raise NanotuneError(f"--overwrite {out}: it is not a GGUF file, so nanotune will not replace it; choose "
                            "another --out or remove it yourself.")
    marker, names = OURS[fmt]
    found = os.listdir(out) if os.path.isdir(out) and not os.path.islink(out) else None
    foreign = None if found is None else [n for n in sorted(found) if not names.fullmatch(n)
                                          or not os.path.isfile(os.path.join(out, n))]
    if found is None or foreign or marker not in found:
        held = "is not a directory" if found is None else f"holds {foreign[0]!r}" if foreign else f"has no {marker}"
        raise NanotuneError(f"--overwrite {out}: it {held}, so it is not a nanotune {fmt} export and nanotune will "
                            "not replace it; choose another --out or remove it yourself.")


def atomic_dir(out, overwrite, fmt):
    if os.path.exists(out) and not overwrite:
        raise NanotuneError(f"{out} exists; pass --overwrite to replace it.")
    if os.path.lexists(out):
        check_replaceable(out, fmt)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise NanotuneError(f"the parent of {out} ({parent}) does not exist; create it first.")
    return fresh_tmp(out)


def export_merged(model, tok, out, dtype=torch.bfloat16, overwrite=False, shard_bytes=5 << 30):
    """config.json, model-0000i-of-0000N.safetensors (+ index), tokenizer files, generation_config.json.
    Shards are written as they fill, so only one shard is ever held in memory."""
    tmp = atomic_dir(out, overwrite, "merged")
    try:
        with writing(out, tmp, sum(p.numel() for p in model.parameters()) * dtype.itemsize):
            formats.write_safetensors(tmp, (finite(name, t.to(dtype), dtype) for name, t in dense_tensors(model)),
                                      shard_bytes)
    except NanotuneError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    formats.write_config(tmp, model.config, dtype)
    eos = sorted(tok.stop_ids)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
                   "pad_token_id": tok.pad_id}, f, indent=2)
    tok.save(tmp)
    publish(tmp, out)


def export_adapter(model, out, base_path, dtype=None, overwrite=False, tok=None):
    """PEFT's adapter_config.json + adapter_model.safetensors, and the trained tokenizer (its chat template) beside
    them, as trainers save it."""
    if not lora.lora_layers(model):
        raise NanotuneError("this model has no LoRA adapter to export; use --format merged or gguf.")
    tmp = atomic_dir(out, overwrite, "adapter")
    lora.save_adapter(model, tmp, base_model_name=formats.hub_id(base_path), base_path=base_path, dtype=dtype,
                      **adapter_names(model.config, saving=True))
    if tok is not None:
        tok.save(tmp)
    publish(tmp, out)


# ---------------------------------------------------------------------------------------------
# GGUF: formats.write_gguf writes float and block types; k-quants go through llama.cpp's quantizer
def export_gguf(model, tok, out, qtype="f16", overwrite=False):
    qtype = qtype.lower()
    if qtype in K_QUANTS:
        return export_kquant(model, tok, out, qtype, overwrite)
    if qtype not in FLOAT_TYPES and qtype not in BLOCK_TYPES:
        raise NanotuneError(f"unknown quant type {qtype!r}; choose from {', '.join(QUANTS)}.")
    if os.path.exists(out) and not overwrite:
        raise NanotuneError(f"{out} exists; pass --overwrite to replace it.")
    if os.path.lexists(out):
        check_replaceable(out, "gguf")
    cfg = model.config
    arch = gguf_mixers.arch_of(cfg)
    gguf_mixers.check(cfg)  # (what llama.cpp cannot run of the mixer archs; nothing for the others)
    if cfg.query_pre_attn_scalar not in (None, cfg.head_dim):
        raise NanotuneError("llama.cpp scales attention by 1/sqrt(head_dim); this model's "
                            f"query_pre_attn_scalar ({cfg.query_pre_attn_scalar}) differs, so its GGUF would be wrong.")
    if arch == "smollm3" and cfg.no_rope_layers != [int((i + 1) % 4 != 0) for i in range(cfg.num_hidden_layers)]:
        raise NanotuneError("llama.cpp's smollm3 skips RoPE on every 4th layer and on no other; this model's "
                            f"no_rope_layers {cfg.no_rope_layers} differ, so its GGUF would be wrong.")
    if cfg.clip_qkv is not None and arch != "mpt":  # (measured: with attention.clamp_kqv set, llama.cpp's olmoe
        #                                              differs by 0.16; its mpt clamps the fused output, as MPT does)
        raise NanotuneError(f"llama.cpp clamps q, k, v elsewhere than {cfg.model_type} does (clip_qkv "
                            f"{cfg.clip_qkv}, after the q/k norms), so this model's GGUF would be wrong.")
    if arch not in ("smollm3", "cohere2", "llama4", "granitehybrid", "nemotron_h", "nemotron_h_moe") and \
            cfg.no_rope_layers and not all(cfg.no_rope_layers):  # (on
        raise NanotuneError(f"llama.cpp's {arch} rotates every layer, and this model's full-attention layers have "
                            "no RoPE, so its GGUF would be wrong.")  # llama-cpp-python 0.3.36: its exaone4 does)
    if arch == "mpt" and cfg.attention_multiplier:
        raise NanotuneError(f"llama.cpp's mpt scales attention by 1/sqrt(head_dim); this model's softmax_scale "
                            f"({cfg.attention_multiplier}) differs, so its GGUF would be wrong; export --format "
                            "merged instead.")
    if arch == "falcon" and (cfg.alibi or cfg.qkv_bias or not cfg.parallel_block):
        raise NanotuneError("llama.cpp's falcon runs parallel blocks with RoPE and no linear biases, and this model "
                            "(falcon-rw's layout: ALiBi, biases, a sequential block) is not one; export --format "
                            "merged instead.")
    if arch == "phimoe":  # (measured: llama-cpp-python 0.3.36 asks for an RMS-norm epsilon for it)
        raise NanotuneError("llama.cpp's phimoe normalises with RMSNorm where PhiMoE uses LayerNorm, and routes by a "
                            "renormalised softmax rather than the sparsemixer, so this model's GGUF would be wrong; "
                            "export --format merged instead.")
    if arch == "gemma4":
        gemma4_gguf_check(cfg)
    dense = [i for i in range(cfg.num_hidden_layers) if cfg.num_experts and not (  # (Nemotron-H: its mixer layers
        cfg.is_sparse(i) or cfg.moe_block or cfg.single_mixer)]  # have no MLP)
    if arch in GGUF_LEADING_DENSE and dense == list(range(cfg.first_k_dense_replace)) or arch == "llama4" and \
            dense == [i for i in range(cfg.num_hidden_layers) if (i + 1) % cfg.decoder_sparse_step]:
        dense = []  # (llama.cpp's leading_dense_block_count, interleave_moe_layer_step)
    if arch == "llama4":
        llama4_gguf_check(cfg)
    if cfg.num_experts and arch in GGUF_NORM_TOPK and bool(cfg.norm_topk_prob) != GGUF_NORM_TOPK[arch]:
        raise NanotuneError(f"llama.cpp's {arch} {'always' if GGUF_NORM_TOPK[arch] else 'never'} renormalises the "
                            f"top-k routing weights, but this model has norm_topk_prob {cfg.norm_topk_prob}, so its "
                            "GGUF would be wrong; export --format merged instead.")
    if dense:
        raise NanotuneError(f"llama.cpp's {arch} makes every layer sparse, but layers {dense} of this model are "
                            "dense (mlp_only_layers / decoder_sparse_step), so its GGUF would be wrong; export "
                            "--format merged instead.")
    if cfg.swiglu_limit and (cfg.swiglu_alpha, cfg.swiglu_limit) != (1.702, 7.0):
        raise NanotuneError(f"llama.cpp's {arch} clamps the experts' SwiGLU with alpha 1.702 and limit 7.0, but this "
                            f"model has {cfg.swiglu_alpha} and {cfg.swiglu_limit}, so its GGUF would be wrong; export "
                            "--format merged instead.")
    if (cfg.rope_scaling or {}).get("truncate") is False:  # gpt-oss (other archs are refused in formats.py)
        print(f"warning: llama.cpp rounds YaRN's correction range to whole dims (this model's truncate=false does "
              f"not), as in every {arch} GGUF: a few rotary frequencies differ slightly from transformers'.",
              file=sys.stderr)
    if cfg.attn_scale and not cfg.temperature_nope_only and arch != "mistral4":  # (measured: llama-cpp-python
        #                            0.3.36's mistral3 ignores the keys; its mistral4 (deepseek2's graph) reads them)
        print(f"warning: llama.cpp's {arch} does not scale the queries by position (this model's llama_4_scaling_beta "
              f"{cfg.attn_scale}); beyond {int(cfg.floor_scale)} tokens the GGUF attends differently.", file=sys.stderr)
    if cfg.sliding_window and not formats.FAMILIES[cfg.model_type].gguf_window:
        print(f"warning: llama.cpp's {arch} has no sliding window; beyond {cfg.sliding_window} tokens the GGUF "
              "attends to more than this model.", file=sys.stderr)
    tmp = out + ".tmp"
    try:
        formats.write_gguf(tmp, cfg, tok, lambda: dense_tensors(model, unstack=False), qtype)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    publish(tmp, out)


def llama4_gguf_check(cfg):
    """llama.cpp's llama4 has no keys for these: it fixes them (its llama.cpp loader), so a model with others is
    refused rather than exported to a GGUF that runs differently."""
    fixed = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1,
             "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(cfg.num_hidden_layers)],
             "qk_norm": "rms_post" if cfg.num_experts != 128 else None}
    for k, v in fixed.items():
        if getattr(cfg, k) != v:
            raise NanotuneError(f"llama.cpp's llama4 fixes {k} at {v!r} (it has no GGUF key for it), but this model "
                                f"has {getattr(cfg, k)!r}, so its GGUF would be wrong; export --format merged instead.")


def gemma4_gguf_check(cfg):
    """llama.cpp's gemma4 fixes what its keys cannot say: which layer a KV-sharing layer reads (the last sliding /
    full layer before the first sharing one), at least one sliding layer, the per-layer table over the whole
    vocabulary."""
    first, types = cfg.num_hidden_layers - cfg.num_kv_shared_layers, cfg.layer_types or []
    if "sliding_attention" not in types or cfg.num_kv_shared_layers and (
            first < 2 or types[first - 1] != "full_attention" or types[first - 2] != "sliding_attention"):
        raise NanotuneError("llama.cpp's gemma4 needs a sliding layer and, where layers share k/v, a sliding then a "
                            f"full layer just before the first sharing one (layer {first}); this model's layer_types "
                            "differ, so its GGUF would be wrong; export --format merged instead.")
    if cfg.hidden_size_per_layer_input and cfg.vocab_size_per_layer_input != cfg.vocab_size:
        raise NanotuneError("llama.cpp's gemma4 looks per-layer inputs up over the whole vocabulary "
                            f"({cfg.vocab_size}), but this model's table has {cfg.vocab_size_per_layer_input} rows, "
                            "so its GGUF would be wrong; export --format merged instead.")


def export_kquant(model, tok, out, qtype, overwrite):
    """k-quants come from llama.cpp's own quantizer (through llama-cpp-python): f16 GGUF -> qtype."""
    try:
        import ctypes

        import llama_cpp
    except ImportError:
        raise NanotuneError(f"{qtype} needs llama-cpp-python (pip install llama-cpp-python); without it use one of "
                            f"{', '.join([*FLOAT_TYPES, *BLOCK_TYPES])}.")
    if os.path.exists(out) and not overwrite:
        raise NanotuneError(f"{out} exists; pass --overwrite to replace it.")
    if os.path.lexists(out):
        check_replaceable(out, "gguf")
    f16 = out + ".f16.tmp"
    if os.path.isfile(f16):  # (an interrupted export's own temp file)
        os.remove(f16)
    export_gguf(model, tok, f16, "f16")
    rows = [int(t.shape[0]) for t in ggufread.read(f16).tensors if len(t.shape) > 1]  # ne0: the row length
    odd = sorted({r for r in rows if r % 256})
    if odd:  # k-quant blocks hold 256 values of a row; llama.cpp gives other rows a larger fallback type
        print(f"note: {qtype}: {sum(r % 256 != 0 for r in rows)} of {len(rows)} weight matrices have rows of "
              f"{', '.join(map(str, odd))} values, not a multiple of 256, so llama.cpp stores them in a larger "
              "fallback type and the file ends bigger than a true k-quant; q4_0, q4_1 or q5_0 suit this model.",
              file=sys.stderr)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[qtype]
    with quiet():  # llama.cpp logs every tensor (hundreds of lines, from C and through Python's stderr)
        rc = llama_cpp.llama_model_quantize(f16.encode(), (out + ".tmp").encode(), ctypes.byref(params))
    os.remove(f16)
    if rc != 0:
        raise NanotuneError(f"llama.cpp could not quantize to {qtype} (code {rc}).")
    publish(out + ".tmp", out)


# ---------------------------------------------------------------------------------------------
# Ollama
# Ollama's Modelfile has no escapes: a value is a bare word, "..." or """...""" (newlines allowed), and it ends at
# the first space or newline after its closing quotes. So text that holds three double quotes cannot be written
# into a value at all (it would close it, and what follows would be read as directives); nanotune refuses it.
def ollama_modelfile(gguf_path, tok, system=None) -> str:
    """FROM, TEMPLATE (the chat template as Go's template language, checked to render as it does), stops,
    SYSTEM (--system)."""
    turns = chat_turns(tok)
    if turns is None:
        raise NanotuneError("the chat template is not plain text around each message (it writes today's date, moves "
                            "the system message or renders the last turn apart), so no Ollama template would render "
                            "it alike; drop --ollama or train with a built-in chat_template (chatml, llama3, gemma, "
                            "phi3).")
    if turns.system and '"""' in turns.system:
        print('warning: the chat template\'s default system prompt holds """, which an Ollama Modelfile cannot '
              "quote; the Modelfile has none (pass --system to give one).", file=sys.stderr)
        turns = turns._replace(system=None)
    template = ollama_template(turns)
    if '"""' in template:
        raise NanotuneError('the chat template writes """ around messages, which an Ollama Modelfile cannot quote; '
                            "drop --ollama or train with a built-in chat_template.")
    name = os.path.basename(gguf_path)
    if not re.fullmatch(r"[\w.+-]+", name):
        raise NanotuneError(f"the GGUF's file name {name!r} has characters a Modelfile's FROM cannot hold (spaces, "
                            "quotes, newlines); export to a name of letters, digits, '.', '_', '-' and '+'.")
    lines = [f"FROM ./{name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in ollama_stops(turns)]
    if system is not None and '"""' in system:
        raise NanotuneError('--system holds """, which an Ollama Modelfile cannot quote; remove it from the prompt.')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def is_our_modelfile(path) -> bool:
    """A Modelfile nanotune wrote: a regular file that starts with FROM ./<the GGUF beside it>."""
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    with open(path, "rb") as f:
        first = f.read(256).split(b"\n", 1)[0]
    return re.fullmatch(rb"FROM \./[\w.+-]+", first) is not None


# ---------------------------------------------------------------------------------------------
# Loading what to export, verifying what was written
def load_for_export(args):
    """(model, tokenizer, base path, is_lora) from --run OUTPUT_DIR or --model [+ --adapter]."""
    model_path, adapter, four_bit, dtype = args.model, args.adapter, False, "bfloat16"
    if args.run:
        cfg_path = os.path.join(args.run, "config.yaml")
        if not os.path.isfile(cfg_path):
            raise NanotuneError(f"{args.run} has no config.yaml; pass a train.py output directory.")
        import yaml
        try:
            with open(cfg_path, encoding="utf-8") as f:
                run = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise NanotuneError(f"{cfg_path} is not valid YAML ({str(e).splitlines()[0][:80]}); it is not a train.py "
                                "run's config: pass the run's own output directory.")
        if not isinstance(run, dict) or not isinstance(run.get("model"), (str, type(None))):
            raise NanotuneError(f"{cfg_path} is not a train.py run config (not a mapping of settings); pass the "
                                "run's own output directory.")
        four_bit = run.get("load_in_4bit", False)
        dtype = run.get("dtype") if run.get("dtype") in ("float32", "bfloat16", "float16") else dtype
        if os.path.isdir(os.path.join(args.run, "adapter")):
            model_path, adapter = model_path or run["model"], os.path.join(args.run, "adapter")
        elif os.path.isdir(os.path.join(args.run, "model")):
            model_path = os.path.join(args.run, "model")
        else:
            raise NanotuneError(f"{args.run} has no finished result (adapter/ or model/); let the run finish or "
                                "resume it.")
    model_path = resolve_model_path(model_path)
    model = load_model(model_path, dtype=torch.float32, prepare=quant.prepare_4bit if four_bit else None)
    tok = load_tokenizer(adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer.json")) else model_path)
    if adapter:
        lora.load_adapter(model, adapter, **adapter_names(model.config, saving=False))
    return model, tok, model_path, bool(adapter), dtype


VERIFY_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Who are you?"]
# --verify's verdict: the next-token distribution of what was written against the fp32 model in memory, as
# KL(model || export) in nats, at most this much by what was written; and the same next token (lossy 2-6 bit
# GGUF types may swap near-ties: the export's choice among the model's top 5). Measured on the default job's
# result (llama.cpp, transformers, peft): f32 / merged fp32 / adapter < 1e-10, f16 2e-5, bf16 1.5e-4,
# q8_0 8e-3, q4_k_m 0.12, q4_0 0.22, q2_k 0.52.
VERIFY_KL = {"float32": 1e-5, "f32": 1e-5, "float16": 1e-3, "f16": 1e-3, "bfloat16": 1e-2, "bf16": 1e-2,
             "q8_0": 5e-2}
LOSSY_KL = {"q2_k": 1.5, "q3_k_s": 1.0, "q3_k_m": 1.0, "q3_k_l": 1.0}  # others (4-6 bit): 0.5


@torch.no_grad()
def next_token_logits(model, ids):
    return model.logits(model(torch.tensor([ids], device=next(model.parameters()).device))[0, -1]).float().cpu()


def reader_logits(fmt, out, base_path, prompts):
    """(who read it back, next-token logits per prompt): transformers / peft / llama.cpp when installed,
    else nanotune's own readers."""
    try:
        if fmt == "gguf":
            import llama_cpp
            llm = llama_cpp.Llama(model_path=out, n_ctx=256, logits_all=True, verbose=False,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
            got = []
            for p in prompts:
                llm.reset()
                llm.eval(p)
                got.append(torch.tensor(llm.scores[len(p) - 1]))
            return "llama.cpp", got
        import transformers
        if fmt == "merged":
            hf, who = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), "transformers"
        else:
            import peft
            d, f = (os.path.dirname(base_path), os.path.basename(base_path)) if base_path.endswith(".gguf") else (
                base_path, None)
            base = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
            hf, who = peft.PeftModel.from_pretrained(base, out), "peft"
        hf.eval()
        with torch.no_grad():
            return who, [hf(input_ids=torch.tensor([p])).logits[0, -1].float() for p in prompts]
    except ImportError:
        if fmt != "adapter":
            return "nanotune", [next_token_logits(load_model(out), p) for p in prompts]
        base = load_model(base_path)
        re = lora.load_adapter(base, out, **adapter_names(base.config, saving=False))
        return "nanotune", [next_token_logits(re, p) for p in prompts]


def verify(fmt, out, model, tok, base_path, written):
    """Reload what was written and compare next-token distributions with the in-memory model; a verdict
    against VERIFY_KL (`written`: the dtype or GGUF type), exit 1 when it fails."""
    prompts = [tok.chat([{"role": "user", "content": p}]) for p in VERIFY_PROMPTS]
    want = [next_token_logits(model, p) for p in prompts]
    who, got = reader_logits(fmt, out, base_path, prompts)
    tol, failed, worst = VERIFY_KL.get(written, LOSSY_KL.get(written, 0.5)), 0, 0.0
    for p, a, b in zip(VERIFY_PROMPTS, want, got):
        kl = float(F.kl_div(b.double().log_softmax(-1), a.double().log_softmax(-1), log_target=True, reduction="sum"))
        same = int(a.argmax()) == int(b.argmax())
        near = same or (written not in VERIFY_KL and int(b.argmax()) in a.topk(5).indices.tolist())
        print(f"verify ({who}): KL {kl:.2e}, max |dlogit| {float((a - b).abs().max()):.3e}, top-1 "
              f"{'same' if same else 'DIFFERENT'}  {p!r}")
        ok = math.isfinite(kl) and kl <= tol and near
        failed += not ok
        worst = max(worst, kl) if math.isfinite(kl) else math.inf
    if failed:
        raise NanotuneError(f"verify failed: {who}'s reading of {out} differs from the model on {failed} of "
                            f"{len(prompts)} prompts (KL up to {worst:.2e}, allowed {tol:g} for {written}, or another "
                            "next token); do not ship it: re-export, or report the model and format.")
    print(f"verify: passed ({written}: KL <= {worst:.2e}, allowed {tol:g}; the model's next token)")


def written_chat(fmt, out):
    """(who read it, the chat template, stops(id) -> whether generation ends there, or None where the format keeps no
    stop ids: an adapter) of what was written: llama.cpp / transformers when installed, else nanotune's readers."""
    try:
        if fmt == "gguf":
            import llama_cpp
            with quiet():  # (a vocabulary-only load warns that the context exceeds the training one: it has none)
                llm = llama_cpp.Llama(model_path=out, vocab_only=True, n_ctx=8, verbose=False)
            return "llama.cpp", llm.metadata.get("tokenizer.chat_template"), \
                lambda i: bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, i))  # (llm held: its vocab lives)
        import transformers
        template = transformers.AutoTokenizer.from_pretrained(out).chat_template
        if fmt == "adapter":
            return "transformers", template, None
        eos = transformers.GenerationConfig.from_pretrained(out).eos_token_id
        return "transformers", template, set(eos if isinstance(eos, list) else [eos]).__contains__
    except ImportError:
        own = load_tokenizer(out)
        if fmt == "merged":
            with open(os.path.join(out, "generation_config.json")) as f:
                eos = json.load(f).get("eos_token_id")
            return "nanotune", own.chat_template, set(eos if isinstance(eos, list) else [eos]).__contains__
        return "nanotune", own.chat_template, own.stop_ids.__contains__ if fmt == "gguf" else None


def verify_chat(fmt, out, tok):
    """The export's chat template is the one the run trained with, and its reader stops at the end of every trained
    turn (the markers the template writes); exit 1 otherwise."""
    who, template, stops = written_chat(fmt, out)
    if tok.chat_template and template != tok.chat_template:
        raise NanotuneError(f"verify failed: the chat template {who} reads from {out} is not the one the model was "
                            "trained with, so chats would be formatted differently; re-export from the run (its "
                            "tokenizer carries the trained template).")
    ends = tok.turn_ends()
    missed = [f"{m} ({i})" for m, i in ends.items() if stops is not None and not stops(i)]
    if missed:
        raise NanotuneError(f"verify failed: {who} does not stop generating at {', '.join(missed)}, which ends every "
                            f"trained turn, so replies would run on; re-export (eos and the stop ids come from the "
                            "run's tokenizer).")
    print(f"verify: the trained chat template and its turn end{'s' * (len(ends) > 1)} "
          f"({', '.join(ends) or 'none'}){' as stop ids' if stops else ''}, as {who} reads {out}")


def adapter_reference(model, out, base_path):
    """What an adapter export is compared with: the model, or where its base is 4-bit / FP8 (the adapter was trained
    over that rounding) the checkpoint's 16-bit base with the written adapter, as PEFT users apply it."""
    if not any(hasattr(m, "nbytes") or hasattr(m, "float8") for m in model.modules()):
        return model
    print("verify: the base in memory is 4-bit / FP8; the adapter is checked over the checkpoint's own weights")
    return lora.load_adapter(load_model(base_path), out, **adapter_names(model.config, saving=False))


def verified(fmt, out, model, tok, base_path, written):
    """verify + verify_chat; an export that fails is moved to <out>.unverified, not left under a finished name."""
    try:
        if fmt == "adapter":
            model = adapter_reference(model, out, base_path)
        verify(fmt, out, model, tok, base_path, written)
        verify_chat(fmt, out, tok)
    except NanotuneError as e:
        aside = out + ".unverified"
        if os.path.lexists(aside):
            shutil.rmtree(aside) if os.path.isdir(aside) else os.remove(aside)
        os.replace(out, aside)
        raise NanotuneError(f"{e} (the export was moved to {aside})")


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a train.py output directory (reads its config.yaml, adapter/ or model/)")
    p.add_argument("--model", help="base model (HF dir, .gguf, hub id) when not using --run")
    p.add_argument("--adapter", help="LoRA adapter directory to fold in")
    p.add_argument("--format", required=True, choices=["merged", "adapter", "gguf"])
    p.add_argument("--out", help="output path (default: <run>/merged, <run>/adapter-export, <run>/model-<quant>.gguf)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="merged: weight dtype (default: the run's, else bfloat16); adapter: cast the adapter "
                        "(default float32)")
    p.add_argument("--quant", default="f16", help="gguf: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1, or k-quants "
                                                  "(q4_k_m, q5_k_m, q6_k, ...) with llama-cpp-python")
    p.add_argument("--ollama", action="store_true", help="gguf: also write an Ollama Modelfile beside it")
    p.add_argument("--system", default=None, help="--ollama: the Modelfile's system prompt")
    p.add_argument("--verify", action="store_true", help="(the default) reload the export (with transformers, peft "
                   "or llama.cpp when installed) and compare next-token logits; exit 1 past the format's tolerance")
    p.add_argument("--no_verify", action="store_true", help="skip --verify")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    a = p.parse_args(argv)
    if not (a.run or a.model or a.adapter):
        a.model = None  # the default model
    if a.format == "gguf" and a.quant.lower() not in {**FLOAT_TYPES, **BLOCK_TYPES, **K_QUANTS}:
        raise NanotuneError(f"unknown quant type {a.quant!r}; choose from {', '.join(QUANTS)}.")
    base = a.run or "."
    out = a.out or os.path.join(base, {"merged": "merged", "adapter": "adapter-export",
                                       "gguf": f"model-{a.quant.lower()}.gguf"}[a.format])
    if os.path.exists(out) and not a.overwrite:
        raise NanotuneError(f"{out} exists; pass --overwrite to replace it.")
    if os.path.lexists(out):  # (before the model is loaded: a refusal costs nothing)
        check_replaceable(out, a.format)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise NanotuneError(f"--out {out}: the directory {parent} does not exist; create it or choose another path.")
    modelfile = os.path.join(parent, "Modelfile")
    if a.ollama and os.path.lexists(modelfile) and not a.overwrite:
        raise NanotuneError(f"{modelfile} exists; pass --overwrite to replace it.")
    if a.ollama and os.path.lexists(modelfile) and not is_our_modelfile(modelfile):
        raise NanotuneError(f"--overwrite {modelfile}: it is not a Modelfile nanotune wrote, so nanotune will not "
                            "replace it; move it or export to another directory.")
    model, tok, base_path, has_lora, run_dtype = load_for_export(a)
    if a.format == "merged":
        written = a.dtype or run_dtype  # the run's precision unless asked otherwise
        export_merged(model, tok, out, getattr(torch, written), a.overwrite)
    elif a.format == "adapter":
        written = a.dtype or "float32"
        export_adapter(model, out, base_path, getattr(torch, written), a.overwrite, tok)
    else:
        written = a.quant.lower()
        export_gguf(model, tok, out, a.quant, a.overwrite)
        if a.ollama:  # (checked before the export: see above)
            with open(modelfile + ".tmp", "w") as f:
                f.write(ollama_modelfile(out, tok, a.system))
            publish(modelfile + ".tmp", modelfile)
    print(f"wrote {out} ({written})")
    if not a.no_verify:
        verified(a.format, out, model, tok, base_path, written)


if __name__ == "__main__":
    cli(main)
