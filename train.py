"""nanotune SFT: fine-tune a model (LoRA, or full) on chat / instruction / text data.

    python train.py                                   # default model + bundled identity set, a few minutes on CPU
    python train.py --config examples/smollm2_identity.yaml --lr 5e-4
    python train.py --model ./Llama-3.2-1B-Instruct --datasets data.jsonl --max_len 2048 --packing true
    python train.py --load_in_4bit true               # QLoRA: NF4 base, LoRA adapters
    python train.py --lora false --lr 2e-5            # full fine-tuning
    python train.py --resume                          # continue from the latest checkpoint in --output_dir

Every TrainConfig field is a --flag and a YAML key (flags override the YAML). The resolved config is
printed and saved as <output_dir>/config.yaml. At the end <output_dir>/adapter (PEFT format) or
<output_dir>/model (HF layout) holds the result, with metrics.jsonl and before/after samples beside it.
"""
import argparse
import dataclasses
import difflib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import dist
import kernels
import lora
import quant
from lora import DEFAULT_TARGETS
from data import IGNORE, Sampler, build_dataset, collate, dataset_spec, pack, resolve_template
from model import NanotuneError, Parser, assign_param, cli, generate, load_model, load_tokenizer, resolve_model_path


def F_(default, help):  # noqa: N802 - a dataclass field with its --help text
    return field(default_factory=lambda: default, metadata={"help": help}) if isinstance(default, list) else \
        field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train
    model: str | None = F_(None, "HF directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    output_dir: str = F_("out", "where checkpoints, metrics and the result go (its parent must exist)")
    datasets: list = F_(["examples/identity.jsonl"], "dataset files; in YAML also {path, type, weight} entries")
    chat_template: str | None = F_(None, "the model's own (default), a built-in (chatml, llama3, gemma, phi3), a file or inline Jinja2")
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
    lora_r: int = F_(16, "LoRA rank")
    lora_alpha: float = F_(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    lora_dropout: float = F_(0.0, "dropout on the LoRA input")
    lora_targets: list = F_(list(DEFAULT_TARGETS), "module names that get adapters")
    use_rslora: bool = F_(False, "rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = F_(False, "weight-decomposed LoRA (DoRA)")
    train_modules: list = F_([], "modules trained in full beside LoRA, e.g. embed_tokens lm_head")
    # optimisation
    lr: float = F_(1e-3, "peak learning rate (tuned for the default job; 1e-4..2e-4 is usual for 7B+ LoRA)")
    schedule: str = F_("cosine", "cosine | linear | constant, after warmup")
    warmup_steps: int = F_(0, "linear warmup steps")
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
    resume: str | None = F_(None, "'latest' (or a bare --resume) or a checkpoint path")
    overwrite: bool = F_(False, "replace the run already in output_dir (without it such a directory is refused)")
    sample_prompts: list = F_([], "prompts answered before and after training")
    sample_prompts_file: str | None = F_("examples/identity_prompts.txt", "file with one held-out prompt per line")
    sample_max_tokens: int = F_(48, "tokens generated per sample prompt")


# ---------------------------------------------------------------------------------------------
# Config: flags and YAML, one source of truth
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
    "lr": (lambda v: v > 0 and math.isfinite(v), "a number > 0 (1e-4..1e-3 is usual for LoRA)"),
    "schedule": (lambda v: v in ("cosine", "linear", "constant"), "cosine, linear or constant"),
    "warmup_steps": (lambda v: v >= 0, "a whole number >= 0"),
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
}


def _convert(f: dataclasses.Field, value, where):
    """Coerce a CLI string or YAML value to the field's type; a wrong one is a one-line error."""
    t = str(f.type)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if "None" in t:
            return None
        raise NanotuneError(f"{where}{f.name} needs a value ({getattr(f.type, '__name__', t)}); remove the key to "
                            "keep the default.")
    try:
        if "bool" in t and not isinstance(value, bool):
            if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return str(value).lower() in ("true", "1", "yes")
        if "list" in t:
            if isinstance(value, (dict, bool)):
                raise ValueError
            return value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        if ("int" in t or "float" in t) and isinstance(value, (bool, list, dict)):
            raise ValueError  # YAML `true` or [1] is no number
        if "int" in t:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in t:
            return float(value)
        if isinstance(value, (list, dict)):
            raise ValueError
        return value if isinstance(value, (bool, int, float, str)) else str(value)
    except (TypeError, ValueError, OverflowError):
        raise NanotuneError(f"{where}{f.name} must be {getattr(f.type, '__name__', t)}, got {value!r}.")


def check_limits(cfg, where):
    """Refuse a value outside its legal range (LIMITS, and a subclass's own `limits`) in one sentence."""
    for name, (ok, legal) in {**LIMITS, **getattr(cfg, "limits", {})}.items():
        v = getattr(cfg, name)
        if v is not None and not ok(v):
            raise NanotuneError(f"{where.get(name, '--')}{name} {v!r} is out of range; use {legal}.")


def _closest(key, names):
    """The nearest valid name, by spelling or by another tool's name for it (ALIASES); "" when none is near."""
    m = difflib.get_close_matches(key, [*names, *ALIASES], n=1, cutoff=0.5)
    return ALIASES.get(m[0], m[0]) if m else ""


class _Parser(Parser):
    def error(self, message):
        if "unrecognized arguments" in message:
            flag = message.split(":", 1)[1].split()[0]
            near = _closest(flag.split("=")[0].lstrip("-"), self.names)
            raise NanotuneError(f"unknown flag {flag}{f' (did you mean --{near}?)' if near else ''}; see --help.")
        super().error(message)


def read_yaml(path, names):
    """{field: value} from a YAML mapping; another tool's key names are accepted (ALIASES)."""
    import yaml
    if not os.path.isfile(path):
        raise NanotuneError(f"config file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as fh:
            y = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise NanotuneError(f"{path}: not valid YAML ({str(e).splitlines()[0]}).")
    y = {} if y is None else y
    if not isinstance(y, dict):
        raise NanotuneError(f"{path}: the top level must be a mapping of keys (lr: 1e-4, ...), got a "
                            f"{type(y).__name__}.")
    values = {}
    for k, v in y.items():
        name = ALIASES.get(k, k)
        if name not in names:
            near = _closest(str(k), names)
            raise NanotuneError(f"{path}: unknown key {k!r}{f' (did you mean {near!r}?)' if near else ''}.")
        if name in values:
            raise NanotuneError(f"{path}: {k!r} and another key both set {name}; keep one.")
        values[name] = v
    return values


def parse_config(argv=None, cls=TrainConfig):
    names = [f.name for f in fields(cls)]
    p = _Parser(description=sys.modules[cls.__module__].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False)
    p.names = [*names, "config"]  # for the nearest-name hint
    p.add_argument("--config", help="YAML file with any of the keys below")
    aka = {n: [a for a, t in ALIASES.items() if t == n] for n in names}
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=argparse.SUPPRESS, dest=f.name, help=f"{f.metadata.get('help', '')} (default: {default})")
        flags = [f"--{f.name}", *(f"--{a}" for a in aka[f.name])]
        if "list" in str(f.type):
            p.add_argument(*flags, nargs="*", **kw)
        elif "bool" in str(f.type) or f.name == "resume":
            p.add_argument(*flags, nargs="?", const="latest" if f.name == "resume" else "true", **kw)
        else:
            p.add_argument(*flags, **kw)
    args = vars(p.parse_args(argv))
    path = args.pop("config", None)
    values = read_yaml(path, names) if path else {}
    where = {k: f"{path}: " for k in values} | {k: "--" for k in args}
    values.update(args)
    byname = {f.name: f for f in fields(cls)}
    cfg = cls(**{k: _convert(byname[k], v, where[k] if where[k] != "--" else "") for k, v in values.items()})
    check_limits(cfg, where)
    return cfg


def save_config(cfg, path):
    import yaml
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
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
        keep_freed_memory()
    return torch.device(device), dtype


def keep_freed_memory():
    """CPU training frees and re-allocates the same GBs of activations every step. glibc's malloc hands
    blocks over ~32 MiB back to the OS at once (mmap/munmap), so each step page-faults them in again
    (freshly zeroed pages): ~1 s of a 5.9 s default-job step on the 2-core CI machine. Keep them: larger
    blocks come from the heap (M_MMAP_THRESHOLD), and freed memory is not trimmed (M_TRIM_THRESHOLD,
    M_TOP_PAD). The process's resident memory then stays at its peak. glibc only; elsewhere a no-op."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    libc.mallopt(M_TOP_PAD, 1 << 30)


def build_model(cfg, device, dtype):
    """Load -> (LoRA | full) -> checkpointing; LoRA weights stay fp32 (the precision policy)."""
    if cfg.load_in_4bit and not cfg.lora:
        raise NanotuneError("load_in_4bit needs lora true: 4-bit base weights are frozen.")
    if dist.is_dist():  # torchrun: LoRA and FSDP2 on the meta model, then every rank loads only its shards
        if cfg.load_in_4bit and cfg.use_dora:
            raise NanotuneError("DoRA over a 4-bit base is not supported under torchrun/FSDP; use LoRA, or one GPU.")
        model = load_model(cfg.model, dtype=dtype, device=device, prepare=lambda m: shard_on_meta(m, cfg, device, dtype))
    else:
        model = load_model(cfg.model, dtype=dtype, device=device,
                           prepare=quant.prepare_4bit if cfg.load_in_4bit else None)
        if cfg.lora:
            lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.use_rslora,
                            cfg.use_dora, cfg.train_modules)
    init_lora(model, cfg.seed)
    model.gradient_checkpointing = (device.type == "cuda") if cfg.gradient_checkpointing is None else \
        cfg.gradient_checkpointing
    model.offload_activations = (device.type == "cuda") if cfg.offload_activations is None else \
        cfg.offload_activations
    model.varlen = cfg.varlen_attention
    return model


def shard_on_meta(model, cfg, device, dtype):
    """Still on the meta device: base weights to `dtype`, LoRA (fp32) applied, FSDP2 sharding, then each
    rank allocates only its shards; load_tensors fills them tensor by tensor (4-bit: each rank quantizes
    a weight as it is read and keeps its share of the packed bytes)."""
    model.to(dtype)
    if cfg.load_in_4bit:
        quant.prepare_4bit(model, storage=dtype)  # FSDP gathers in dtype (dist.shard)
    if cfg.lora:
        lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.use_rslora,
                        cfg.use_dora, cfg.train_modules)
    dist.shard(model, device, dtype)
    model.to_empty(device=device)


@torch.no_grad()
def init_lora(model, seed):
    """Seeded LoRA init, identical at any world size: the same full A on every rank (Kaiming-uniform with
    a=sqrt(5), as PEFT), each rank keeping its rows when sharded; B = 0; DoRA's magnitude = the norms of
    the (local) rows of W."""
    g = torch.Generator().manual_seed(seed)
    for _, m in lora.lora_layers(model):
        a = m.lora_A.weight
        bound = 1 / math.sqrt(m.in_features)
        full = torch.empty(a.shape).uniform_(-bound, bound, generator=g)
        if hasattr(a, "to_local"):
            assign_param(a, full)  # this rank's rows
            m.lora_B.weight.to_local().zero_()
            if m.lora_magnitude_vector is not None:
                m.lora_magnitude_vector.to_local().copy_(m.base.weight.to_local().float().norm(dim=1))
        else:
            a.copy_(full)


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
        return kernels.linear_cross_entropy(h, head.weight, y, model.config.final_logit_softcapping, IGNORE, rows)
    h, y = kernels.trained_part(h, y, IGNORE, rows)
    return F.cross_entropy(model.logits(h).float(), y, ignore_index=IGNORE, reduction="sum")


def n_trained(batch):
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def make_optimizer(model, cfg, device):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def make_schedule(opt, cfg, total_steps):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return {"cosine": 0.5 * (1 + math.cos(math.pi * t)), "linear": 1 - t, "constant": 1.0}[cfg.schedule]
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise NanotuneError(f"schedule {cfg.schedule!r} is not one of cosine, linear, constant.")
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


class SFT:
    """What SFT plugs into the shared loop (dpo.py plugs in its own): batches, a summed loss with
    metrics, and the count the step's loss is normalised by (here: trained tokens). pad_to: rows are
    padded to this length (one shape for CUDA graphs)."""
    name = "train"

    def __init__(self, pad_to=None):
        self.pad_to = pad_to

    def collate(self, rows, tok):
        return collate(rows, tok.pad_id, self.pad_to)

    def loss(self, model, batch):
        return model.run(token_loss_sum, batch), {}

    def count(self, batch):
        return n_trained(batch)

    def evaluate(self, model, rows, cfg, tok, device):
        return {"eval_loss": evaluate(model, rows, cfg, tok.pad_id, device)}


def accumulate(model, micro_batches, task, graph=None):
    """Backward over micro-batches. Each micro-batch's summed loss is divided by the count of the
    whole step (trained tokens for SFT, pairs for DPO), so any micro-batch x accumulation split gives
    the same loss and gradient. Returns (loss, count, input tokens, metrics averaged the same way), the
    count and tokens summed over every rank (one collective, before backward needs the global count).
    graph: a GraphedLoss that runs forward and backward of the SFT loss instead."""
    total, tokens = dist.all_sums([sum(task.count(b) for b in micro_batches),
                                   sum(b["input_ids"].numel() for b in micro_batches)])
    W, norm = dist.world(), max(total, 1)
    loss, metrics = 0.0, {}
    for b in micro_batches:
        if graph is not None:
            part, mets = graph(b, 1 / norm) / norm, {}
        else:
            part, mets = task.loss(model, b)
            part = part / norm
            (part * W).backward()  # FSDP averages over the W ranks; x W makes it the global sum
        loss += part.item()
        for k, v in mets.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / norm
    if dist.is_dist():  # the loss and every metric in one collective
        loss, *vals = dist.all_sums([loss, *metrics.values()])
        metrics = dict(zip(metrics, vals))
    return loss, total, tokens, metrics


def train_step(model, opt, sched, micro_batches, task, max_grad_norm, graph=None):
    """accumulate -> clip -> AdamW step -> schedule step; returns (loss, grad norm, count, tokens, metrics)."""
    loss, total, tokens, metrics = accumulate(model, micro_batches, task, graph)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = dist.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=graph is None)  # a CUDA graph adds into the gradients where it found them
    return loss, float(norm), total, tokens, metrics


class GraphedLoss:
    """--cuda_graphs: forward + backward of the SFT loss recorded as a CUDA graph, then replayed.
    A small model's step is bound by the CPU launching its ~3,000 kernels one by one (Llama-3.2-1B at
    4 x 2048: the GPU idles ~15% of the step); a replay launches them all at once. A replay reads the batch
    from fixed tensors and writes the loss and the gradients to the same memory every time, so:
    - fixed shapes: packed rows padded to max_len. One graph per batch shape (the last batch of an epoch
      may have fewer rows), at most MAX_GRAPHS, all in one memory pool (they never run at the same time);
    - the gradients stay allocated and the graph adds into them (zeroed after each step, never set to None);
    - nothing in it may make the CPU wait for the GPU: the loss keeps every row (token_loss_sum every_row);
    - no dropout (its RNG state is read on the host), no varlen attention (it reads lengths back), one process.
    A shape's first batch runs eagerly (Triton compiles, cuBLAS picks its kernels, AdamW makes its state);
    its second is captured, then every batch of that shape is copied in and replayed."""
    MAX_GRAPHS = 4

    def __init__(self, model):
        self.model, self.graphs, self.seen, self.pool = model, {}, set(), None
        self.calls, self.replays = 0, 0  # micro-batches seen; how many of them a graph ran

    def loss(self, batch, scale):
        loss = self.model.run(token_loss_sum, batch, True)
        (loss * scale).backward()
        return loss.detach()

    def capture(self, batch):
        """-> (static batch, static scale, static loss, graph), recorded without running anything."""
        for p in self.model.parameters():  # the graph adds into these: they must exist before it
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        static = {k: v.clone() for k, v in batch.items()}
        scale = torch.ones((), device=batch["input_ids"].device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self.loss(static, scale)
        self.pool = g.pool()
        return static, scale, out, g

    def __call__(self, batch, scale):
        """Summed loss of `batch`; its gradient times `scale` is added to every .grad."""
        self.calls += 1
        key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
        if key not in self.graphs:
            if key not in self.seen or len(self.graphs) >= self.MAX_GRAPHS or not batch["input_ids"].is_cuda:
                self.seen.add(key)  # (on CPU every call runs eagerly: the tests)
                return self.loss(batch, scale)
            self.graphs[key] = self.capture(batch)
        static, static_scale, out, g = self.graphs[key]
        for k, v in batch.items():
            static[k].copy_(v, non_blocking=True)
        static_scale.fill_(scale)
        g.replay()
        self.replays += 1
        return out


def check_cuda_graphs(cfg, device):
    """One sentence naming every setting --cuda_graphs cannot run with (see GraphedLoss)."""
    if type(cfg) is not TrainConfig:
        raise NanotuneError("cuda_graphs is a train.py (SFT) option; preference training runs eagerly, turn it off.")
    needs = [(device.type == "cuda", "a CUDA device"), (cfg.packing, "packing true"),
             (not dist.is_dist(), "one process (not torchrun)"), (not cfg.lora_dropout, "lora_dropout 0"),
             (not cfg.varlen_attention, "varlen_attention false")]
    missing = [what for ok, what in needs if not ok]
    if missing:
        raise NanotuneError(f"cuda_graphs needs {', '.join(missing)}; change that or turn cuda_graphs off.")


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
    out = [tok.decode(generate(model, tok.chat([{"role": "user", "content": p}]), max_tokens,
                               stop_ids=tok.stop_ids)).strip() for p in prompts]
    model.train(was)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints: trainable weights, optimizer, schedule, sampler, RNG; temp dir + rename
def trainable_state(model):
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(cfg, step, model, opt, sched, sampler):
    """checkpoints/step-NNNNNN: trainable weights (or DCP shards), state.pt (tensors and plain values only),
    the run's config.yaml and meta.json (step, world size); written as .tmp, then renamed."""
    from safetensors.torch import save_file
    out_dir, keep = cfg.output_dir, cfg.save_total_limit
    check_weights_finite(model, f"step {step}", "checkpoint")
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    state = {"step": step, "scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "rng": rng}
    if dist.is_dist():  # sharded weights + optimizer, readable at any world size
        dist.save_sharded(os.path.join(tmp, "dcp"), model, opt)
    else:
        save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
        state["optimizer"] = opt.state_dict()
    dist.barrier()
    if not dist.is_main():
        return
    torch.save(state, os.path.join(tmp, "state.pt"))
    save_config(cfg, os.path.join(tmp, "config.yaml"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": step, "world": dist.world()}, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = finished_checkpoints(root)
    for d in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def finished_checkpoints(root):
    """step-NNNNNN directories in order, without the temp ones a crash may have left."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))


def find_checkpoint(cfg):
    if cfg.resume in (None, "", "false"):
        return None
    if cfg.resume not in ("latest", "true"):
        if not os.path.isfile(os.path.join(cfg.resume, "state.pt")):
            raise NanotuneError(f"--resume {cfg.resume!r} is not a checkpoint directory (no state.pt).")
        return cfg.resume
    root = os.path.join(cfg.output_dir, "checkpoints")
    done = finished_checkpoints(root)
    if not done:
        raise NanotuneError(f"--resume: no checkpoint in {root}; train with --save_steps N first.")
    return os.path.join(root, done[-1])


def load_checkpoint(path, model, opt, sched, sampler):
    from safetensors.torch import load_file
    sharded = os.path.isdir(os.path.join(path, "dcp"))
    if sharded != dist.is_dist():
        raise NanotuneError(f"{path} was written {'under' if sharded else 'without'} torchrun; resume it the same "
                            "way (under torchrun any number of processes can resume a sharded checkpoint).")
    try:  # tensors and plain values only: a checkpoint never runs code
        s = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    except Exception as e:
        raise NanotuneError(f"{path}/state.pt could not be loaded as plain training state "
                            f"({str(e).splitlines()[0][:120]}); it is corrupt or not nanotune's: resume from another "
                            "checkpoint or start a new run.")
    if sharded:
        dist.load_sharded(os.path.join(path, "dcp"), model, opt)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in load_file(os.path.join(path, "trainable.safetensors")).items():
                if n not in params or params[n].shape != t.shape:
                    raise NanotuneError(f"{path}: tensor {n!r} does not fit this model; resume with the run's "
                                        "own settings.")
                params[n].copy_(t)
        opt.load_state_dict(s["optimizer"])
    sched.load_state_dict(s["scheduler"])
    sampler.load_state_dict(s["sampler"])
    torch.set_rng_state(s["rng"]["torch"])
    random.setstate(s["rng"]["python"])
    if s["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["rng"]["cuda"])
    return s["step"]


# ---------------------------------------------------------------------------------------------
def rank_slice(idx, r, w):
    """This rank's part of a global micro-batch (contiguous, so the split is the same at any world size)."""
    n = -(-len(idx) // w)
    return idx[r * n : (r + 1) * n]


# what a run writes in output_dir: one of these there means the directory holds a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "adapter", "model", "samples.json", "loss.png", "tb")
# settings a resume may change: they do not change what is trained (the rest must match the checkpoint)
RESUMABLE = {"resume", "overwrite", "output_dir", "device", "dist_timeout", "log_steps", "eval_steps", "save_steps",
             "save_total_limit", "sample_prompts", "sample_prompts_file", "sample_max_tokens", "cache_dir",
             "gradient_checkpointing", "offload_activations", "cuda_graphs", "varlen_attention"}


def check_output_dir(cfg):
    """output_dir can take this run: its parent exists, it is no file, and an earlier run in it is only
    continued (--resume) or replaced (--overwrite), never mixed into."""
    out = cfg.output_dir
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise NanotuneError(f"output_dir {out!r}: its parent {parent!r} does not exist; create it or "
                            "choose another output_dir.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise NanotuneError(f"output_dir {out!r} is a file; choose a directory name.")
    if cfg.resume and cfg.overwrite:
        raise NanotuneError("--resume continues the run in output_dir and --overwrite replaces it; pass one of them.")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if held and not cfg.resume and not cfg.overwrite:
        raise NanotuneError(f"output_dir {out!r} holds an earlier run ({', '.join(held)}); pass --resume to "
                            "continue it, --overwrite to replace it, or choose another output_dir.")


def check_resume(cfg, ckpt):
    """The checkpoint's run must be this run: every setting that changes the training is the same (the
    global batch, micro_batch_size x processes, may be split another way)."""
    import yaml
    path = os.path.join(ckpt, "config.yaml")
    if not os.path.isfile(path):  # a checkpoint from before checkpoints kept their config
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "config.yaml")
    if not os.path.isfile(path):
        raise NanotuneError(f"{ckpt} has no config.yaml with it, so nothing shows it belongs to this run; "
                            "start a new run instead.")
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    meta_path = os.path.join(ckpt, "meta.json")
    world = json.load(open(meta_path))["world"] if os.path.isfile(meta_path) else dist.world()
    defaults = {f.name: _default(f) for f in fields(cfg)}
    now = dataclasses.asdict(cfg)
    diff = [k for k, v in now.items() if k not in RESUMABLE and k != "micro_batch_size"
            and saved.get(k, defaults[k]) != v]
    if saved.get("micro_batch_size", defaults["micro_batch_size"]) * world != cfg.micro_batch_size * dist.world():
        diff.append("micro_batch_size")
    if diff:
        shown = ", ".join(f"{k} ({saved.get(k, defaults[k])!r} there, {now[k]!r} now)" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise NanotuneError(f"--resume: {ckpt} was trained with other settings: {shown}{more}; resume with the "
                            "run's own settings (see its config.yaml) or start a new run.")


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def clear_run(out):
    """--overwrite: remove what an earlier run wrote in `out` (nothing else there is touched)."""
    for f in RUN_FILES:
        p = os.path.join(out, f)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p) if os.path.exists(p) else None


def truncate_metrics(path, step):
    """A resumed run's metrics.jsonl keeps only the rows up to its checkpoint's step (the killed run may
    have written more)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def check_finite(step, **values):
    """Stop at the first non-finite loss or gradient norm, before anything is saved from it."""
    bad = [f"{k.replace('_', ' ')} {v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise NanotuneError(f"step {step}: the {' and the '.join(bad)}; stopped without saving anything from this "
                            "step (lower lr, set max_grad_norm, or check the data and the base weights).")


def check_weights_finite(model, when, what):
    """Every trainable weight is finite (summed over ranks): a non-finite checkpoint or result is never written."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
    n = float(torch.stack([(~torch.isfinite(p)).sum() for p in local]).sum()) if local else 0.0
    bad = int(dist.all_sums([n])[0])
    if bad:
        raise NanotuneError(f"{when}: {bad} trained weights are not finite, so the {what} was not written "
                            "(lower lr, set max_grad_norm, or check the data).")


def finite_or_none(metrics):
    """Metric values for metrics.jsonl: a non-finite one becomes null (JSON has no NaN)."""
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}


def check_inputs(cfg):
    """Every file the run reads exists and every dataset entry is well formed (before the model loads)."""
    for spec in [*cfg.datasets, *([cfg.eval_file] if cfg.eval_file else [])]:
        dataset_spec(spec)
    if cfg.sample_prompts_file and not os.path.isfile(cfg.sample_prompts_file):
        raise NanotuneError(f"sample_prompts_file {cfg.sample_prompts_file!r} does not exist; pass a file with one "
                            "prompt per line, or '' for none.")
    resolve_template(cfg.chat_template)


def split_eval(samples, cfg, tok, build):
    """(train, eval) samples: a separate eval_file, or a seeded val_set_size hold-out."""
    if cfg.eval_file:
        return samples, build([cfg.eval_file])[0]
    if not cfg.val_set_size:
        return samples, []
    n = held_out(cfg.val_set_size, len(samples))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return [samples[i] for i in order[n:]], [samples[i] for i in order[:n]]


def held_out(val_set_size, n):
    """How many of n samples val_set_size (a fraction < 1 or a count) holds out; at least one must be left."""
    k = int(val_set_size if val_set_size >= 1 else round(val_set_size * n))
    if k >= n:
        raise NanotuneError(f"val_set_size {val_set_size:g} holds out {k} of the {n} samples and leaves none to "
                            f"train on; use at most {n - 1}, or a fraction below 1.")
    return k


def prepare_data(cfg, tok):
    cache = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else None
    build = lambda specs: build_dataset(specs, tok, cfg.max_len, cfg.truncation, cfg.chat_template,  # noqa: E731
                                        cfg.roles_to_train, cfg.train_on_inputs, cfg.seed, cache)
    samples, stats = build(cfg.datasets)
    train_s, eval_s = split_eval(samples, cfg, tok, build)
    if cfg.packing:
        rows, eff = pack(train_s, cfg.max_len)
        stats["packing_efficiency"] = round(eff, 4)
    else:
        rows = train_s
    stats.update(rows=len(rows), eval_samples=len(eval_s))
    return rows, eval_s, stats


def log(msg):
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


def main(argv=None):
    cfg = parse_config(argv)
    model, tok, device = setup(cfg)
    rows, eval_s, stats = prepare_data(cfg, tok)
    log(f"data: {json.dumps(stats)}")
    fit(cfg, model, tok, rows, eval_s, SFT(cfg.max_len if cfg.cuda_graphs else None), device)


def setup(cfg):
    """Check the run's inputs and output dir, seed, pick device/dtype, print the config, load tokenizer and
    model (+ LoRA / 4-bit). Everything a user can get wrong is checked before the model loads."""
    check_output_dir(cfg)
    check_inputs(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device, dtype = pick_device(cfg)
    device = dist.init(cfg.device, cfg.dist_timeout) or device  # under torchrun: this rank's GPU (or CPU)
    if cfg.cuda_graphs:
        check_cuda_graphs(cfg, device)
    cfg.model = resolve_model_path(cfg.model)
    cfg.dtype = str(dtype).removeprefix("torch.")  # config.yaml records what ran, not "auto"
    ckpt = find_checkpoint(cfg)
    if ckpt:
        check_resume(cfg, ckpt)
    log(f"nanotune {type(cfg).__name__}:\n" + "\n".join(f"  {k}: {v}" for k, v in dataclasses.asdict(cfg).items()))
    log(f"loading {cfg.model} ...")
    tok = load_tokenizer(cfg.model)
    if cfg.chat_template:  # one template for the data, the samples, the saved tokenizer and the exports
        tok.chat_template = resolve_template(cfg.chat_template)
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
    return model, tok, device


def fit(cfg, model, tok, rows, eval_rows, task, device):
    """The loop every trainer shares: sampler, AdamW + schedule, accumulation, eval and samples,
    atomic checkpoints and exact resume, progress bar and metrics.jsonl, then the result."""
    R, W = dist.rank(), dist.world()
    graph = GraphedLoss(model) if cfg.cuda_graphs else None
    sampler = Sampler(len(rows), cfg.micro_batch_size * W, cfg.seed)  # a global batch; each rank takes a slice
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * sampler.batches_per_epoch() / cfg.grad_accum))
    opt = make_optimizer(model, cfg, device)
    sched = make_schedule(opt, cfg, steps)
    if dist.is_main():
        if cfg.overwrite:
            clear_run(cfg.output_dir)
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    dist.barrier()
    start = 0
    ckpt = last_ckpt = find_checkpoint(cfg)
    if ckpt:
        start = load_checkpoint(ckpt, model, opt, sched, sampler)
        if dist.is_main():
            truncate_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), start)
        log(f"resumed from {ckpt} at step {start}")

    prompts = list(cfg.sample_prompts)
    if cfg.sample_prompts_file and os.path.isfile(cfg.sample_prompts_file):
        with open(cfg.sample_prompts_file) as f:
            prompts += [ln.strip() for ln in f if ln.strip()]
    if dist.is_dist():
        prompts = []  # sample generations are a single-process feature (generate.py on the result)
    before = None
    if prompts and not ckpt:
        log(f"answering {len(prompts)} sample prompt(s) before training ...")
        before = answer_prompts(model, tok, prompts, cfg.sample_max_tokens)

    from tqdm import tqdm
    metrics = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a" if ckpt else "w") if dist.is_main() \
        else open(os.devnull, "w")
    if eval_rows and not ckpt:  # the baseline the eval curve starts from
        run_eval(model, tok, eval_rows, [], cfg, device, 0, metrics, None, task)
    bar = tqdm(total=steps, initial=start, desc=task.name, dynamic_ncols=True, file=sys.stderr,
               disable=not dist.is_main())
    tb = tensorboard(cfg.output_dir) if dist.is_main() else None
    t0, tokens_seen, step = time.time(), 0, start
    try:
        for step in range(start + 1, steps + 1):
            micro = [to_device(task.collate([rows[i] for i in rank_slice(sampler.next(), R, W)], tok), device)
                     for _ in range(cfg.grad_accum)]
            loss, gnorm, count, tokens, mets = train_step(model, opt, sched, micro, task, cfg.max_grad_norm, graph)
            check_finite(step, loss=loss, gradient_norm=gnorm)
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
                metrics.write(json.dumps(finite_or_none(row)) + "\n")
                metrics.flush()
                if tb:
                    for k, v in {"loss": loss, **mets, "lr": sched.get_last_lr()[0], "grad_norm": gnorm}.items():
                        tb.add_scalar(f"train/{k}", v, step)
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != steps:
                run_eval(model, tok, eval_rows, prompts, cfg, device, step, metrics, bar, task)
            if cfg.save_steps and step % cfg.save_steps == 0 and step != steps:
                save_checkpoint(cfg, step, model, opt, sched, sampler)
                last_ckpt = os.path.join(cfg.output_dir, "checkpoints", f"step-{step:06d}")
    except RuntimeError as e:
        if not dist.is_timeout(e):
            raise
        raise NanotuneError(f"rank {R} waited {cfg.dist_timeout:g} s for the other ranks at step {step} (one of them "
                            f"hung or died); the job stops{f', the last checkpoint is {last_ckpt}' if last_ckpt else ''}"
                            " (--dist_timeout sets the wait).")
    except KeyboardInterrupt:
        bar.close()
        raise NanotuneError(f"interrupted at step {step}; " + (
            f"the last checkpoint is {last_ckpt}: run the same command with --resume to continue from it."
            if last_ckpt else "no checkpoint was saved (--save_steps N keeps some), so nothing was kept."))
    bar.close()
    if graph is not None:
        log(f"cuda graphs: {graph.replays} of {graph.calls} micro-batches replayed from {len(graph.graphs)} "
            "graph(s); the rest ran eagerly (each shape's first, or shapes beyond the graphs kept)")
    after = run_eval(model, tok, eval_rows, prompts, cfg, device, steps, metrics, None, task)
    metrics.close()
    finish(model, tok, cfg, prompts, before, after)


def tensorboard(out_dir):
    """A TensorBoard writer in <output_dir>/tb when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


def run_eval(model, tok, eval_rows, prompts, cfg, device, step, metrics, bar, task):
    if eval_rows:
        res = task.evaluate(model, eval_rows, cfg, tok, device)
        metrics.write(json.dumps(finite_or_none({"step": step, **res})) + "\n")
        (bar.write if bar else log)(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    answers = answer_prompts(model, tok, prompts, cfg.sample_max_tokens) if prompts else []
    for p, a in zip(prompts[:2], answers) if bar else []:
        bar.write(f"  [{step}] {p!r} -> {a!r}")
    return answers


def finish(model, tok, cfg, prompts, before, after):
    """Write the result (adapter or full model), the samples and a loss plot; print before/after."""
    from model import save_hf
    main_rank = dist.is_main()  # under FSDP every rank gathers, rank 0 writes
    check_weights_finite(model, "after the last step", "result")
    if cfg.lora:
        result = os.path.join(cfg.output_dir, "adapter")
        tmp = result + ".tmp"  # renamed once complete: a crash never leaves an adapter/ that looks finished
        if main_rank:
            shutil.rmtree(tmp, ignore_errors=True)
        lora.save_adapter(model, tmp, base_model_name=cfg.model, write=main_rank)
        if main_rank:
            tok.save(tmp)
            shutil.rmtree(result, ignore_errors=True)
            os.replace(tmp, result)
    else:
        result = os.path.join(cfg.output_dir, "model")
        save_hf(model, result, tokenizer=tok, write=main_rank)
    dist.barrier()
    if not main_rank:
        return
    if prompts:
        samples = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before or [None] * len(prompts), after)]
        with open(os.path.join(cfg.output_dir, "samples.json"), "w") as f:
            json.dump(samples, f, indent=2, ensure_ascii=False)
        for s in samples:
            log(f"\nQ: {s['prompt']}\n  before: {s['before']}\n  after:  {s['after']}")
    plot_losses(cfg.output_dir)
    log(f"\ndone: {result}")


def plot_losses(out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("(loss.png not drawn: matplotlib is not installed; `pip install matplotlib` adds it, metrics.jsonl "
            "has every step)")
        return
    rows = [json.loads(ln) for ln in open(os.path.join(out_dir, "metrics.jsonl"))]
    tr = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    plt.figure(figsize=(6, 3.5))
    plt.plot(*zip(*tr), label="train")
    if ev:
        plt.plot(*zip(*ev), "o-", label="eval")
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.legend()
    plt.tight_layout()
    plt.savefig(os.path.join(out_dir, "loss.png"), dpi=100)


if __name__ == "__main__":
    cli(main, dist.shutdown)
