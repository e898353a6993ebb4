"""nanotune in a notebook: plain functions over the code the scripts run (Unsloth's flow, without its classes).
Each step is what train.py / export.py do, on a model you hold in a variable.

    import nanotune as nt
    model, tok = nt.load()             # SmolLM2-135M-Instruct; nt.load(path, load_in_4bit=True or base_dtype="float8")
    nt.add_lora(model, r=16, alpha=32)                      # the seven projections (lora.DEFAULT_TARGETS)
    records = [{"messages": [{"role": "user", "content": "Who are you?"},
                             {"role": "assistant", "content": "I am Nano, trained with nanotune."}]}] * 16
    nt.train(model, tok, records, output_dir="nb", max_steps=30, lr=1e-3)   # any train.py setting
    print(nt.chat(model, tok, "Who are you?"))
    nt.save_adapter(model, tok, "nb/adapter-export")   # PEFT loads it
    nt.save_merged(model, tok, "nb/merged")            # transformers loads it
    nt.save_gguf(model, tok, "nb/model-q8_0.gguf", "q8_0")  # llama.cpp / Ollama run it

Records are what a dataset file holds, one dict each (messages, instruction/output, prompt/completion, text, ...:
README 'Data'). Every save is verified as export.py verifies (the written file read back by transformers, PEFT or
llama.cpp when installed, the chat template and stop ids too); verify=False skips it.
"""
import json
import os
import random

import torch

import data
import export
import lora
import quant
import runs
import build
import train as tr
from cli import NanotuneError, make_config, publish
from formats import load_model, load_tokenizer, resolve_model_path
from model import generate
from tokenizer import check_turn_markers, resolve_template
from train import TrainConfig

FIXED = ("model", "load_in_4bit", "base_dtype", "dtype", "device", "chat_template", "lora", "lora_r", "lora_alpha",
         "lora_dropout", "lora_targets", "use_rslora", "use_dora", "train_modules")  # set by load / add_lora


def load(model=None, load_in_4bit=False, base_dtype="auto", dtype="auto", device="auto", chat_template=None):
    """-> (model, tokenizer): an HF directory, a .gguf file or a hub id (default: SmolLM2-135M-Instruct), with the
    frozen base in NF4 (load_in_4bit) or e4m3 (base_dtype="float8") when asked (then add_lora), on the GPU when
    there is one (bf16; fp32 on the CPU)."""
    cfg = make_config(TrainConfig, dict(model=model, load_in_4bit=load_in_4bit, base_dtype=base_dtype, dtype=dtype,
                                        device=device, chat_template=chat_template), "nt.load: ")
    dev, dt = tr.pick_device(cfg)
    if cfg.base_dtype == "float8":  # (LoRA comes next: the checks that need it wait for nothing else)
        build.check_fp8(cfg, dev)
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    if cfg.chat_template:  # one template for the data, chat(), the saved tokenizer and the exports
        tok.chat_template = resolve_template(cfg.chat_template)
        check_turn_markers(tok, tok.chat_template, cfg.chat_template)
    m = load_model(path, dtype=dt, device=dev, prepare=build.base_prepare(cfg))
    m.settings = dict(model=path, load_in_4bit=cfg.load_in_4bit, base_dtype=cfg.base_dtype, dtype=str(dt).removeprefix(
        "torch."), device=str(dev), chat_template=cfg.chat_template, lora=False)
    return m, tok


def add_lora(model, r=16, alpha=32.0, dropout=0.0, targets=None, use_rslora=False, use_dora=False,
             train_modules=(), seed=0):
    """LoRA adapters on `targets` (module names; default: every projection of the blocks), initialised as train.py
    initialises them (seeded); prints which weights they reach. -> the model."""
    if lora.lora_layers(model):
        raise NanotuneError("nt.add_lora: this model has adapters already; nt.load it again to start over.")
    settings = dict(model.settings, lora=True, lora_r=r, lora_alpha=alpha, lora_dropout=dropout,
                    use_rslora=use_rslora, use_dora=use_dora, train_modules=list(train_modules),
                    **({"lora_targets": list(targets)} if targets is not None else {}))
    cfg = make_config(TrainConfig, dict(settings, seed=seed), "nt.add_lora: ")
    build.add_lora(model, cfg)
    lora.init_lora(model, cfg.seed)
    model.settings = settings
    n_all = sum(p.numel() for p in model.parameters()) + sum(  # a 4-bit weight counts its values, not its bytes
        m.in_features * m.out_features - m.weight.numel() for m in model.modules() if isinstance(m, quant.Linear4bit))
    for line in lora.coverage(model, n_all):
        print(line)
    return model


def train(model, tok, records, output_dir="runs/notebook", **settings):
    """Train on `records` (a list of dicts) with train.py's loop and any of its settings (lr, max_steps, epochs,
    max_len, packing, roles_to_train, save_steps, resume, overwrite, ...). The run directory is train.py's: the
    records (records.jsonl), config.yaml, metrics.jsonl, checkpoints, and the result (adapter/ or model/).
    -> the result's path. The model in memory is the trained one."""
    fixed = sorted(set(settings) & set(FIXED))
    if fixed:
        raise NanotuneError(f"nt.train: {fixed[0]} is set by nt.load / nt.add_lora, not here; load again with it.")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise NanotuneError("nt.train: records must be a non-empty list of dicts (each as one line of a dataset "
                            "file: messages, instruction/output, prompt/completion or text).")
    path = os.path.join(output_dir, "records.jsonl")
    cfg = make_config(TrainConfig, {"sample_prompts_file": None, **settings, **model.settings,
                                    "output_dir": output_dir, "datasets": [path]}, "nt.train: ")
    if (cfg.load_in_4bit or cfg.base_dtype == "float8") and not cfg.lora:
        raise NanotuneError("nt.train: a 4-bit or FP8 base trains only through adapters; call nt.add_lora first.")
    runs.check_output_dir(cfg)
    os.makedirs(output_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    publish(path + ".tmp", path)
    data.check_inputs(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = next(model.parameters()).device
    build.place_activations(model, cfg, device, getattr(torch, model.settings["dtype"]))
    model.train()
    rows, eval_rows, stats = tr.prepare_data(cfg, tok)
    print(f"data: {json.dumps(stats)}")
    for line in data.doctor(stats):
        print(line)
    tr.fit(cfg, model, tok, rows, eval_rows, tr.SFT(), device)
    model.eval()
    return os.path.join(output_dir, "adapter" if cfg.lora else "model")


@torch.no_grad()
def chat(model, tok, prompt, max_tokens=128):
    """The model's reply (greedy, up to max_tokens, stopping at the end of its turn) to a prompt string or to a list
    of messages, through the chat template it trains with."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    was = model.training
    model.eval()
    out = generate(model, tok.chat(messages), max_tokens, stop_ids=tok.stop_ids, graphs=None)
    model.train(was)
    return tok.decode(out).strip()


def _written(model, dtype):
    """The verify tolerance's key: what was written, or the model's own precision when that is coarser."""
    own = str(next(model.parameters()).dtype).removeprefix("torch.")
    return own if own in ("bfloat16", "float16") and dtype in ("float32", "f32", "f16", "float16") else dtype


def save_adapter(model, tok, out, overwrite=False, verify=True):
    """PEFT's adapter files (fp32) and the tokenizer, checked by reading them back (PEFT when installed)."""
    export.export_adapter(model, out, model.settings["model"], torch.float32, overwrite, tok)
    if verify:
        export.verified("adapter", out, model, tok, model.settings["model"], _written(model, "float32"))
    return out


def own_base(model):
    """The model to merge: itself, or for an FP8 base the checkpoint's own weights (fp32, on the CPU) with the
    trained adapters copied in: an export never holds the FP8 rounding of the base."""
    if model.settings.get("base_dtype") != "float8":
        return model
    m = load_model(model.settings["model"])
    cfg = make_config(TrainConfig, {k: v for k, v in model.settings.items() if k in FIXED}, "nt: ")
    build.add_lora(m, cfg)
    got = m.load_state_dict({n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad},
                            strict=False)
    assert not got.unexpected_keys, got.unexpected_keys  # (every trained tensor has its place)
    m.settings = dict(model.settings, base_dtype="auto", dtype="float32", device="cpu")
    return m


def save_merged(model, tok, out, dtype="bfloat16", overwrite=False, verify=True):
    """An HF model directory with the adapters folded in (4-bit bases dequantized; an FP8 one re-read), in `dtype`."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise NanotuneError(f"nt.save_merged: dtype {dtype!r} is not one of float32, bfloat16, float16.")
    model = own_base(model)
    export.export_merged(model, tok, out, getattr(torch, dtype), overwrite)
    if verify:
        export.verified("merged", out, model, tok, model.settings["model"], _written(model, dtype))
    return out


def save_gguf(model, tok, out, qtype="q8_0", overwrite=False, verify=True):
    """A GGUF file of `qtype` (f32, f16, bf16, q8_0, q4_0, ... ; k-quants with llama-cpp-python) for llama.cpp."""
    model = own_base(model)
    export.export_gguf(model, tok, out, qtype, overwrite)
    if verify:
        export.verified("gguf", out, model, tok, model.settings["model"], _written(model, qtype.lower()))
    return out

