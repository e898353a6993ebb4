"""nanotune SFT: fine-tune a model (LoRA, or full) on chat / instruction / text data.

    python train.py                                   # default model + bundled identity set, a few minutes on CPU
    python train.py --config examples/smollm2_identity.yaml --lr 5e-4
    python train.py --model ./Llama-3.2-1B-Instruct --datasets data.jsonl --max_len 2048 --packing true
    python train.py --load_in_4bit true               # QLoRA: NF4 base, LoRA adapters
    python train.py --lora false --lr 2e-5            # full fine-tuning
    python train.py --resume                          # continue from the latest checkpoint in --output_dir

Every TrainConfig field is a --flag and a YAML key (flags override the YAML). The resolved config is printed and
saved as <output_dir>/config.yaml. At the end <output_dir>/adapter (PEFT format) or <output_dir>/model (HF layout)
holds the result, with metrics.jsonl and before/after samples beside it."""

import dataclasses
import json
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import axolotl
import dist
import kernels
import lora
import memory
import quant
import runs
from cli import F_, NanotuneError, bundled, cli, fresh_tmp, parse_config, publish, save_config, writing
import data
from data import IGNORE, Sampler, build_dataset, collate, pack
from families import DROPOUTS
from build import build_model, log, plan_run
from names import adapter_names
from formats import hub_id, load_tokenizer, resolve_model_path, save_hf
from lora import DEFAULT_TARGETS
from model import generate
from tokenizer import check_turn_markers, resolve_template


# ---------------------------------------------------------------------------------------------
# The run's config: every field is a --flag and a YAML key (cli.parse_config)
# names people type from other tools (transformers' TrainingArguments, Axolotl) -> ours
ALIASES = {"learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
           "num_epochs": "epochs", "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad_accum",
           "max_seq_length": "max_len", "sequence_len": "max_len", "warmup": "warmup_steps"}


DTYPES = ("auto", "float32", "bfloat16", "float16")


# legal values: field -> (test, the legal range in words). A value outside is refused before anything loads.
LIMITS = {
    "max_len": (lambda v: v >= 2, "at least 2 (tokens per sample)"),
    "truncation": (lambda v: v in ("truncate", "drop"), "truncate or drop"),
    "val_set_size": (lambda v: 0 <= v and (v < 1 or v.is_integer()), "a fraction in [0, 1) or a whole count >= 1"),
    "lora_r": (lambda v: v >= 1, "a whole number >= 1"),
    "lora_alpha": (lambda v: v > 0 and math.isfinite(v), "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "router_aux_loss_coef": (lambda v: 0 <= v < math.inf, "a number >= 0 (0.001-0.02 is usual)"),
    "lr": (lambda v: v > 0 and math.isfinite(v), "a number > 0 (1e-4..1e-3 is usual for LoRA)"),
    "schedule": (lambda v: v in ("cosine", "linear", "constant"), "cosine, linear or constant"),
    "warmup_steps": (lambda v: v >= 0, "a whole number >= 0"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "mlp_tile_mib": (lambda v: 0 <= v < math.inf, "a number of MiB >= 0 (0: no tiling)"),
    "base_dtype": (lambda v: v in ("auto", "float8"), "auto or float8"),
    "gpu_memory_gib": (lambda v: 0 < v < math.inf, "a number of GiB > 0"),
    "host_memory_gib": (lambda v: 0 <= v < math.inf, "a number of GiB >= 0"),
    "checkpoint_every": (lambda v: v >= 1, "a whole number >= 1 (1: every block keeps its input)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "epochs": (lambda v: 0 < v < math.inf, "a number > 0"),
    "max_steps": (lambda v: v >= 0, "a whole number >= 0 (0: from epochs)"),
    "micro_batch_size": (lambda v: v >= 1, "a whole number >= 1"),
    "grad_accum": (lambda v: v >= 1, "a whole number >= 1"),
    "max_grad_norm": (lambda v: 0 <= v < math.inf, "a number >= 0 (0: no clipping)"),
    "dtype": (lambda v: v in DTYPES, ", ".join(DTYPES)),
    "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
    "log_steps": (lambda v: v >= 1, "a whole number >= 1"),
    "eval_steps": (lambda v: v >= 0, "a whole number >= 0 (0: only at the end)"),
    "save_steps": (lambda v: v >= 0, "a whole number >= 0 (0: never)"),
    "save_total_limit": (lambda v: v >= 1, "a whole number >= 1"),
    "sample_max_tokens": (lambda v: v >= 1, "a whole number >= 1"),
    "dist_timeout": (lambda v: 0 < v < math.inf, "a number of seconds > 0"),
    "seed": (lambda v: 0 <= v < 2**63, "a whole number in [0, 2**63)"),
}


@dataclasses.dataclass
class TrainConfig:
    # what to train
    model: str | None = F_(None, "HF directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    output_dir: str = F_("out", "where checkpoints, metrics and the result go (its parent must exist)")
    datasets: list = F_([bundled("identity.jsonl")], "dataset files; in YAML also {path, type, weight} entries")
    chat_template: str | None = F_(None, "the model's own (default), a built-in (chatml, llama3, gemma, phi3), "
                                         "a file or inline Jinja2")
    train_on_inputs: bool = F_(False, "take loss on every token, not only on roles_to_train")
    roles_to_train: list = F_(["assistant"], "message roles that carry loss")
    max_len: int = F_(1024, "tokens per sample (and per packed row)")
    truncation: str = F_("truncate", "over-long samples: truncate | drop")
    packing: bool = F_(False, "pack samples into max_len rows (no attention across samples)")
    varlen_attention: bool = F_(False, "packed rows on a GPU: varlen flash attention instead of a block-diagonal "
                                       "mask (less GPU work, more CPU time per layer: see README)")
    val_set_size: float = F_(0.0, "fraction (<1) or count (>=1) of samples held out for eval loss")
    eval_file: str | None = F_(None, "a separate eval dataset file")
    cache_dir: str | None = F_("~/.cache/nanotune", "tokenized-dataset cache ('' to disable)")
    # method
    lora: bool = F_(True, "train LoRA adapters (false: full fine-tuning)")
    load_in_4bit: bool = F_(False, "QLoRA: NF4 base weights (double-quantized), quantized while loading")
    base_dtype: str = F_("auto", "LoRA's frozen base: auto (dtype) | float8 (e4m3 weights with row scales, the "
                                 "base GEMMs in FP8: GPUs of compute capability 8.9+)")
    lora_r: int = F_(16, "LoRA rank")
    lora_alpha: float = F_(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    lora_dropout: float = F_(0.0, "dropout on the LoRA input")
    router_aux_loss_coef: float | None = F_(None, "MoE load-balancing loss weight (default: the checkpoint's, which "
                                                  "is 0 unless its config sets output_router_logits)")
    lora_targets: list = F_(list(DEFAULT_TARGETS), "module names that get adapters")
    use_rslora: bool = F_(False, "rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = F_(False, "weight-decomposed LoRA (DoRA)")
    train_modules: list = F_([], "modules trained in full beside LoRA, e.g. embed_tokens lm_head")
    # optimisation
    lr: float = F_(1e-3, "peak learning rate (tuned for the default job; 1e-4..2e-4 is usual for 7B+ LoRA)")
    schedule: str = F_("cosine", "cosine | linear | constant, after warmup")
    warmup_steps: int = F_(0, "linear warmup steps")
    warmup_ratio: float = F_(0.0, "warmup as a share of the run's steps, when warmup_steps is 0")
    weight_decay: float = F_(0.0, "AdamW weight decay (matrices only)")
    epochs: float = F_(3.0, "passes over the data (when max_steps is 0)")
    max_steps: int = F_(0, "optimizer steps (0: from epochs)")
    micro_batch_size: int = F_(4, "samples (or packed rows) per forward")
    grad_accum: int = F_(1, "micro-batches per optimizer step")
    max_grad_norm: float = F_(1.0, "gradient clipping (0: off)")
    cuda_graphs: bool = F_(False, "replay each micro-batch's forward + backward as one CUDA graph (needs packing; "
                                  "rows are padded to max_len): for small models, whose step waits on the CPU")
    gradient_checkpointing: bool | None = F_(None, "recompute blocks in backward (default: on for GPU)")
    offload_activations: bool | None = F_(None, "with checkpointing: block inputs wait in pinned host memory "
                                                 "(default: on for GPU)")
    plan: bool = F_(False, "print the planner's predicted peak GPU / host memory and the longest sequence that fits, "
                           "then stop (every run prints its one-line plan on a GPU)")
    gpu_memory_gib: float | None = F_(None, "plan for a GPU with this much memory (default: the one in use)")
    host_memory_gib: float | None = F_(None, "offloaded block inputs stay within this much host memory (the first "
                                             "blocks' inputs stay on the GPU; default: the planner's choice)")
    checkpoint_every: int | None = F_(None, "with checkpointing, keep only every k-th block's input (the blocks "
                                            "between run again in backward; default: the planner's choice)")
    mlp_tile_mib: float | None = F_(None, "long sequences: the MLP runs in tiles whose backward tensors fit this "
                                          "many MiB (one more MLP forward; 0: whole; default: the planner's choice)")
    dtype: str = F_("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    device: str = F_("auto", "auto | cpu | cuda | cuda:N")
    seed: int = F_(0, "seed for init, data order and dropout")
    dist_timeout: float = F_(600.0, "torchrun: seconds a rank waits for the others (loading, a step, a save) "
                                    "before the job stops")
    # logging, eval, checkpoints
    log_steps: int = F_(1, "write a metrics line every N steps")
    eval_steps: int = F_(0, "eval loss (and samples) every N steps (0: only at the end)")
    save_steps: int = F_(0, "checkpoint every N steps (0: never)")
    save_total_limit: int = F_(2, "checkpoints kept")
    resume: str | None = F_(None, "'latest' (or a bare --resume) or a checkpoint path", const="latest")
    overwrite: bool = F_(False, "replace the run already in output_dir (without it such a directory is refused)")
    resume_other_data: bool = F_(False, "--resume even though the training data differs from the checkpoint's")
    sample_prompts: list = F_([], "prompts answered before and after training")
    sample_prompts_file: str | None = F_(bundled("identity_prompts.txt"), "file with one held-out prompt per line")
    sample_max_tokens: int = F_(48, "tokens generated per sample prompt")
    limits, aliases = LIMITS, ALIASES  # class attributes, not fields (cli.parse_config reads them)
    migrate = staticmethod(axolotl.migrate)  # (an Axolotl YAML as it is)


# ---------------------------------------------------------------------------------------------
# main -> setup -> build -> data -> fit
def main(argv=None):
    cfg = parse_config(argv, TrainConfig)
    model, tok, device = setup(cfg)
    rows, eval_s, stats = prepare_data(cfg, tok)
    for line in [f"data: {json.dumps(stats)}", *data.doctor(stats)]:
        log(line)
    fit(cfg, model, tok, rows, eval_s, SFT(cfg.max_len, graphed_loss(model)) if cfg.cuda_graphs else SFT(), device)


def setup(cfg):
    """Check inputs and output dir, seed, pick device/dtype, print the config, load tokenizer and model (+ LoRA /
    4-bit). Everything a user can get wrong is checked before the model loads."""
    if cfg.plan:  # (the plan only: nothing is written)
        cfg.model = resolve_model_path(cfg.model)
        plan_run(cfg, *pick_device(cfg))
    runs.check_output_dir(cfg)
    data.check_inputs(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device, dtype = pick_device(cfg)
    device = dist.init(cfg.device, cfg.dist_timeout) or device  # under torchrun: this rank's GPU (or CPU)
    if cfg.cuda_graphs:
        check_cuda_graphs(cfg, device)
    cfg.model = resolve_model_path(cfg.model)
    cfg.dtype = str(dtype).removeprefix("torch.")  # config.yaml records what ran, not "auto"
    ckpt = runs.find_checkpoint(cfg)
    if ckpt:
        runs.check_resume(cfg, ckpt)
    log(f"nanotune {type(cfg).__name__}:\n" + "\n".join(f"  {k}: {v}" for k, v in dataclasses.asdict(cfg).items()))
    if (device.type == "cuda" or cfg.gpu_memory_gib) and not dist.is_dist():  # (FSDP's shards: not planned yet)
        plan_run(cfg, device, dtype)
    log(f"loading {cfg.model} ...")
    tok = load_tokenizer(cfg.model)
    if cfg.chat_template:  # one template for the data, the samples, the saved tokenizer and the exports
        tok.chat_template = resolve_template(cfg.chat_template)
        check_turn_markers(tok, tok.chat_template, cfg.chat_template)
    model = build_model(cfg, device, dtype)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters()) + sum(  # a 4-bit weight counts its values, not its bytes
        m.in_features * m.out_features - m.weight.numel() for m in model.modules() if isinstance(m, quant.Linear4bit))
    if dist.is_dist():
        q4 = [m.weight for m in model.modules() if isinstance(m, quant.Linear4bit)]
        held = sum(w.to_local().nbytes for w in q4) / max(sum(w.numel() * w.element_size() for w in q4), 1)
        log(f"FSDP2 over {dist.world()} ranks: each loaded only its own shard of every tensor"
            + (f" (4-bit weights too: rank 0 holds {100 * held:.0f}% of their bytes)" if q4 else ""))
    log(f"model: {model.config.model_type}, {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable "
        f"({100 * n_train / n_all:.2f}%), {dtype}, {device}")
    for line in lora.coverage(model, n_all) if cfg.lora else []:
        log(line)
    return model, tok, device


# Building blocks (dpo.py reuses these)
def pick_device(cfg):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise NanotuneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                            "--device cpu or auto.")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    if device == "cpu":
        memory.keep_freed_memory()
    return torch.device(device), dtype


def prepare_data(cfg, tok):
    cache = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else None
    build = lambda specs: build_dataset(specs, tok, cfg.max_len, cfg.truncation, cfg.chat_template,  # noqa: E731
                                        cfg.roles_to_train, cfg.train_on_inputs, cfg.seed, cache)
    samples, stats = build(cfg.datasets)
    if cfg.eval_file:
        train_s, eval_s = samples, build([cfg.eval_file])[0]
    else:
        train_s, eval_s = data.split_eval(samples, cfg.val_set_size, cfg.seed)
    if cfg.packing:
        rows, eff = pack(train_s, cfg.max_len)
        stats["packing_efficiency"] = round(eff, 4)
    else:
        rows = train_s
    stats.update(rows=len(rows), eval_samples=len(eval_s))
    return rows, eval_s, stats


# ---------------------------------------------------------------------------------------------
# The loop every trainer shares (dpo.py plugs in its own task)
def fit(cfg, model, tok, rows, eval_rows, task, device):
    """The loop every trainer shares: sampler, AdamW + schedule, accumulation, eval and samples,
    atomic checkpoints and exact resume, progress bar and metrics.jsonl, then the result."""
    R, W = dist.rank(), dist.world()
    sampler = Sampler(len(rows), cfg.micro_batch_size * W, cfg.seed)  # a global batch; each rank takes a slice
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * sampler.batches_per_epoch() / cfg.grad_accum))
    opt = make_optimizer(model, cfg, device)
    sched = make_schedule(opt, cfg, steps)
    if dist.is_main():
        if cfg.overwrite:
            runs.clear_run(cfg.output_dir)
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    dist.barrier()
    start = 0
    ckpt = last_ckpt = runs.find_checkpoint(cfg)
    digest = runs.data_digest(rows)
    if ckpt:
        runs.check_resume_data(cfg, ckpt, digest)
        start = runs.load_checkpoint(ckpt, model, opt, sched, sampler)
        getattr(task, "resume", lambda step: None)(start)  # (grpo.py: its rollout seeds follow the step)
        if dist.is_main():
            runs.truncate_log(os.path.join(cfg.output_dir, "metrics.jsonl"), start)
        log(f"resumed from {ckpt} at step {start}")

    prompts = [] if dist.is_dist() else list(cfg.sample_prompts) + data.read_prompts(cfg.sample_prompts_file)
    #          (sample generations are a single-process feature: generate.py on the result)
    before = None
    if prompts and not ckpt:
        log(f"answering {len(prompts)} sample prompt(s) before training ...")
        before = answer_prompts(model, tok, prompts, cfg.sample_max_tokens)

    from tqdm import tqdm
    path = os.path.join(cfg.output_dir, "metrics.jsonl") if dist.is_main() else os.devnull
    metrics = open(path, "a" if ckpt else "w")
    if eval_rows and not ckpt:  # the baseline the eval curve starts from
        run_eval(model, tok, eval_rows, [], cfg, device, 0, metrics, None, task)
    bar = tqdm(total=steps, initial=start, desc=task.name, dynamic_ncols=True, file=sys.stderr,
               disable=not dist.is_main())
    tb = runs.tensorboard(cfg.output_dir) if dist.is_main() else None
    t0, tokens_seen, step = time.time(), 0, start
    stop = runs.StopSignal()  # (bar.write below: a line of its own, not glued to the bar)
    stall = runs.Stall(lambda msg: bar.write(msg, file=sys.stderr) if dist.is_main() else None, task)
    try:
        for step in range(start + 1, steps + 1):
            micro = [to_device(task.collate([rows[i] for i in dist.rank_slice(sampler.next(), R, W)], tok), device)
                     for _ in range(cfg.grad_accum)]
            loss, gnorm, count, tokens, mets = train_step(model, opt, sched, micro, task, cfg.max_grad_norm)
            for line in lora.stuck(model) if step == start + 1 and cfg.lora and not dist.is_dist() else ():
                log(line)  # (the run doctor: adapters the first step did not move)
            runs.check_finite(step, loss=loss, gradient_norm=gnorm)
            stall.update(gnorm, step)
            tokens_seen += tokens
            tps = tokens_seen / (time.time() - t0)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            bar.update(1)
            shown = {k.split("/")[-1][:12]: f"{v:.3f}" for k, v in list(mets.items())[:3]}
            bar.set_postfix(loss=f"{loss:.4f}", **shown, lr=f"{sched.get_last_lr()[0]:.2e}", tok_s=f"{tps:.0f}",
                            mem=f"{mem:.1f}G" if mem else "-")
            if step % cfg.log_steps == 0 or step == steps:
                row = {"step": step, "loss": loss, **mets, "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
                       "count": count, "tokens_per_s": round(tps, 1), "epoch": sampler.epoch,
                       "peak_mem_gib": round(mem, 3)}
                metrics.write(json.dumps(runs.finite_or_none(row)) + "\n")
                metrics.flush()
                if tb:
                    for k, v in {"loss": loss, **mets, "lr": sched.get_last_lr()[0], "grad_norm": gnorm}.items():
                        tb.add_scalar(f"train/{k}", v, step)
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != steps:
                run_eval(model, tok, eval_rows, prompts, cfg, device, step, metrics, bar, task)
            if cfg.save_steps and step % cfg.save_steps == 0 and step != steps:
                runs.save_checkpoint(cfg, step, model, opt, sched, sampler, digest)
                last_ckpt = os.path.join(cfg.output_dir, "checkpoints", f"step-{step:06d}")
            if stop.requested():  # SIGTERM: this step is done; keep it and end
                here = os.path.join(cfg.output_dir, "checkpoints", f"step-{step:06d}")
                if last_ckpt != here:
                    runs.save_checkpoint(cfg, step, model, opt, sched, sampler, digest)
                raise NanotuneError(f"stopped by SIGTERM after step {step}; the checkpoint {here} holds it: run the "
                                    "same command with --resume to continue from it.")
    except RuntimeError as e:
        if not dist.is_timeout(e):
            raise
        raise NanotuneError(f"rank {R} waited {cfg.dist_timeout:g} s for the other ranks at step {step} (one of them "
                            f"hung or died); the job stops"
                            f"{f', the last checkpoint is {last_ckpt}' if last_ckpt else ''}"
                            " (--dist_timeout sets the wait).")
    except KeyboardInterrupt:
        raise NanotuneError(f"interrupted at step {step}; " + (
            f"the last checkpoint is {last_ckpt}: run the same command with --resume to continue from it."
            if last_ckpt else "no checkpoint was saved (--save_steps N keeps some), so nothing was kept."))
    finally:
        stop.restore()
        bar.close()  # (before any error line, which would otherwise be glued to the bar)
    graph = getattr(task, "graph", None)
    if graph is not None:
        log(f"cuda graphs: {graph.replays} of {graph.calls} micro-batches replayed from {len(graph.graphs)} "
            "graph(s); the rest ran eagerly (each shape's first, or shapes beyond the graphs kept)")
    after = run_eval(model, tok, eval_rows, prompts, cfg, device, steps, metrics, None, task)
    metrics.close()
    finish(model, tok, cfg, prompts, before, after)


def make_optimizer(model, cfg, device):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def make_schedule(opt, cfg, total_steps):
    warm = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)  # (a ratio: transformers' rounding)

    def f(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, total_steps - warm)
        return {"cosine": 0.5 * (1 + math.cos(math.pi * t)), "linear": 1 - t, "constant": 1.0}[cfg.schedule]
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise NanotuneError(f"schedule {cfg.schedule!r} is not one of cosine, linear, constant.")
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def train_step(model, opt, sched, micro_batches, task, max_grad_norm):
    """accumulate -> clip -> AdamW step -> schedule step; returns (loss, grad norm, count, tokens, metrics)."""
    loss, total, tokens, metrics = accumulate(model, micro_batches, task)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = dist.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=getattr(task, "graph", None) is None)  # a CUDA graph adds into the gradients in place
    return loss, float(norm), total, tokens, metrics


def accumulate(model, micro_batches, task):
    """Backward over micro-batches. Each micro-batch's summed loss is divided by the count of the
    whole step (trained tokens for SFT, pairs for DPO), so any micro-batch x accumulation split gives
    the same loss and gradient. Returns (loss, count, input tokens, metrics averaged the same way), the
    count and tokens summed over every rank (one collective, before backward needs the global count)."""
    total, tokens = dist.all_sums([sum(task.count(b) for b in micro_batches),
                                   sum(b["input_ids"].numel() for b in micro_batches)])
    norm = max(total, 1)
    loss, metrics = 0.0, {}
    for b in micro_batches:
        part, mets = task.backward(model, b, norm)
        loss += part.item()
        for k, v in mets.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / norm
    if dist.is_dist():  # the loss and every metric in one collective
        loss, *vals = dist.all_sums([loss, *metrics.values()])
        metrics = dict(zip(metrics, vals))
    return loss, total, tokens, metrics


# ---------------------------------------------------------------------------------------------
# The SFT task: batches, loss (the fused head never builds [tokens x vocab] logits), backward
class SFT:
    """What SFT plugs into the shared loop (dpo.py plugs in its own): batches, a summed loss with
    metrics, its backward, and the count the step's loss is normalised by (here: trained tokens).
    graph: a memory.Graphed replays forward + backward; pad_to: rows are padded to this length (one shape)."""
    name = "train"

    def __init__(self, pad_to=None, graph=None):
        self.pad_to, self.graph = pad_to, graph

    def collate(self, rows, tok):
        return collate(rows, tok.pad_id, self.pad_to)

    def loss(self, model, batch):
        return model.run(token_loss_sum, batch), {}

    def backward(self, model, batch, norm):
        if self.graph is not None:
            return self.graph(batch, 1 / norm) / norm, {}
        return backward(self, model, batch, norm)

    def count(self, batch):
        return n_trained(batch)

    def evaluate(self, model, rows, cfg, tok, device):
        return {"eval_loss": evaluate(model, rows, cfg, tok.pad_id, device)}


def backward(task, model, batch, norm):
    """Backward of task.loss / norm -> (that loss, detached, and the task's metrics). FSDP averages the
    gradients over the W ranks; x W makes them the gradient of the global sum."""
    loss, mets = task.loss(model, batch)
    coef = model.config.router_aux_loss_coef
    aux = model.router_aux() if coef else None
    if aux is not None:  # MoE load balancing, weighted like the loss: coef * aux per counted token
        n = task.count(batch)
        loss, mets = loss + coef * n * aux[0], {**mets, "aux_loss": aux[0].detach() * n}
        aux[1](coef * n * dist.world() / norm)  # its gradient, added in backward (see Transformer.router_aux)
    part = loss / norm
    (part * dist.world()).backward()
    if aux is not None:
        aux[1](None)  # no later backward adds it again
    return part.detach(), mets


def token_loss_sum(model, batch, every_row=False):
    """Summed next-token cross-entropy over trained tokens: position t predicts labels[t + 1].
    every_row: untrained rows go through the head too and add zero (a fixed shape: CUDA graphs)."""
    y = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE).reshape(-1)  # [B*T] target of each position
    # the trained rows, found before the forward (found later, the CPU would wait on a long GPU queue)
    rows = False if every_row else kernels.trained_rows(y, IGNORE)
    h = model.forward(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      position_ids=batch.get("position_ids"))
    h = h.reshape(-1, h.shape[-1])  # [B*T, C]
    head = model.lm_head
    if type(head) is nn.Linear:
        return kernels.linear_cross_entropy(h, head.weight, y, model.config.final_logit_softcapping, IGNORE, rows,
                                            head.bias)
    h, y = kernels.trained_part(h, y, IGNORE, rows)
    return F.cross_entropy(model.logits(h).float(), y, ignore_index=IGNORE, reduction="sum")


def n_trained(batch):
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def graphed_loss(model):
    """--cuda_graphs: the SFT loss's forward + backward recorded once per batch shape and replayed."""
    if any(getattr(model.config, k) for k in ("router_aux_loss_coef", "attention_dropout", *DROPOUTS)):
        raise NanotuneError("cuda_graphs runs neither the MoE load-balancing loss nor the checkpoint's own dropout; "
                            "set router_aux_loss_coef 0 for the first, or turn cuda_graphs off.")
    def loss_backward(batch, scale):
        loss = model.run(token_loss_sum, batch, True)  # every row: one shape, nothing read back on the host
        (loss * scale).backward()
        return loss.detach()
    return memory.Graphed(loss_backward, model)


def check_cuda_graphs(cfg, device):
    """One sentence naming every setting --cuda_graphs cannot run with (see memory.Graphed)."""
    if type(cfg) is not TrainConfig:
        raise NanotuneError("cuda_graphs is a train.py (SFT) option; preference training runs eagerly, turn it off.")
    needs = [(device.type == "cuda", "a CUDA device"), (cfg.packing, "packing true"),
             (not dist.is_dist(), "one process (not torchrun)"), (not cfg.lora_dropout, "lora_dropout 0"),
             (not cfg.varlen_attention, "varlen_attention false")]
    missing = [what for ok, what in needs if not ok]
    if missing:
        raise NanotuneError(f"cuda_graphs needs {', '.join(missing)}; change that or turn cuda_graphs off.")


# ---------------------------------------------------------------------------------------------
# Eval, samples, the result
@torch.no_grad()
def evaluate(model, rows, cfg, pad_id, device, loss_fn=token_loss_sum):
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(rows), cfg.micro_batch_size):
        b = to_device(collate(rows[i : i + cfg.micro_batch_size], pad_id), device)
        total += float(model.run(loss_fn, b))
        n += n_trained(b)
    model.train()
    return total / max(n, 1)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def answer_prompts(model, tok, prompts, max_tokens):
    was = model.training
    model.eval()
    out = [tok.decode(generate(model, tok.chat([{"role": "user", "content": p}]), max_tokens, stop_ids=tok.stop_ids,
                               graphs=None if dist.world() == 1 else False)).strip() for p in prompts]
    model.train(was)
    return out


def run_eval(model, tok, eval_rows, prompts, cfg, device, step, metrics, bar, task):
    if eval_rows:
        res = task.evaluate(model, eval_rows, cfg, tok, device)
        metrics.write(json.dumps(runs.finite_or_none({"step": step, **res})) + "\n")
        (bar.write if bar else log)(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    answers = answer_prompts(model, tok, prompts, cfg.sample_max_tokens) if prompts else []
    for p, a in zip(prompts[:2], answers) if bar else []:
        bar.write(f"  [{step}] {p!r} -> {a!r}")
    return answers


def finish(model, tok, cfg, prompts, before, after):
    """Write the result (adapter or full model), the samples and a loss plot; print before/after."""
    main_rank = dist.is_main()  # under FSDP every rank gathers, rank 0 writes
    runs.check_weights_finite(model, "after the last step", "result")
    if cfg.lora:
        result = os.path.join(cfg.output_dir, "adapter")  # published once complete, never half-written
        tmp = fresh_tmp(result) if main_rank else None
        with writing(result, tmp, sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)):
            lora.save_adapter(model, tmp, base_model_name=hub_id(cfg.model), base_path=cfg.model, write=main_rank,
                              **adapter_names(model.config, saving=True))
            if main_rank:
                tok.save(tmp)
        if main_rank:
            publish(tmp, result)
    else:
        result = os.path.join(cfg.output_dir, "model")
        with writing(result, result + ".tmp", sum(p.numel() * p.element_size() for p in model.parameters())):
            save_hf(model, result, tok, write=main_rank)
    dist.barrier()
    if not main_rank:
        return
    if prompts:
        samples = [{"prompt": p, "before": b, "after": a}
                   for p, b, a in zip(prompts, before or [None] * len(prompts), after)]
        with open(os.path.join(cfg.output_dir, "samples.json"), "w") as f:
            json.dump(samples, f, indent=2, ensure_ascii=False)
        for s in samples:
            log(f"\nQ: {s['prompt']}\n  before: {s['before']}\n  after:  {s['after']}")
    runs.plot_losses(cfg.output_dir, log)
    log(f"\ndone: {result}")




if __name__ == "__main__":
    cli(main, dist.shutdown)
