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
from data import IGNORE, Sampler, build_dataset, collate, pack
from model import NanotuneError, assign_param, cli, generate, load_model, load_tokenizer, resolve_model_path


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
    # logging, eval, checkpoints
    log_steps: int = F_(1, "write a metrics line every N steps")
    eval_steps: int = F_(0, "eval loss (and samples) every N steps (0: only at the end)")
    save_steps: int = F_(0, "checkpoint every N steps (0: never)")
    save_total_limit: int = F_(2, "checkpoints kept")
    resume: str | None = F_(None, "'latest' (or a bare --resume) or a checkpoint path")
    sample_prompts: list = F_([], "prompts answered before and after training")
    sample_prompts_file: str | None = F_("examples/identity_prompts.txt", "file with one held-out prompt per line")
    sample_max_tokens: int = F_(48, "tokens generated per sample prompt")


# ---------------------------------------------------------------------------------------------
# Config: flags and YAML, one source of truth
def _convert(f: dataclasses.Field, value, where):
    """Coerce a CLI string or YAML value to the field's type; a wrong one is a one-line error."""
    t = str(f.type)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in t):
        return None
    try:
        if "bool" in t and not isinstance(value, bool):
            if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return str(value).lower() in ("true", "1", "yes")
        if "list" in t:
            return value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        if "int" in t:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in t:
            return float(value)
        return value if isinstance(value, (bool, int, float, str)) else str(value)
    except (TypeError, ValueError):
        raise NanotuneError(f"{where}{f.name} must be {getattr(f.type, '__name__', t)}, got {value!r}.")


def _closest(key, names):
    m = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if "unrecognized arguments" in message:
            flag = message.split(":", 1)[1].split()[0]
            names = ["--" + f.name for f in fields(TrainConfig)] + ["--config"]
            raise NanotuneError(f"unknown flag {flag}{_closest(flag.split('=')[0], names)}; see --help.")
        raise NanotuneError(message)


def parse_config(argv=None, cls=TrainConfig):
    names = [f.name for f in fields(cls)]
    p = _Parser(description=sys.modules[cls.__module__].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with any of the keys below")
    for f in fields(cls):
        kw = dict(default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} (default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()})")
        if "list" in str(f.type):
            p.add_argument(f"--{f.name}", nargs="*", **kw)
        elif "bool" in str(f.type) or f.name == "resume":
            p.add_argument(f"--{f.name}", nargs="?", const="latest" if f.name == "resume" else "true", **kw)
        else:
            p.add_argument(f"--{f.name}", **kw)
    args = vars(p.parse_args(argv))
    values = {}
    if args.get("config"):
        import yaml
        path = args.pop("config")
        if not os.path.isfile(path):
            raise NanotuneError(f"config file {path!r} does not exist.")
        with open(path) as fh:
            try:
                y = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                raise NanotuneError(f"{path}: not valid YAML ({str(e).splitlines()[0]}).")
        for k, v in y.items():
            if k not in names:
                raise NanotuneError(f"{path}: unknown key {k!r}{_closest(k, names)}.")
            values[k] = v
    args.pop("config", None)
    values.update(args)
    byname = {f.name: f for f in fields(cls)}
    cfg = cls(**{k: _convert(byname[k], v, "") for k, v in values.items()})
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
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return torch.device(device), dtype


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


def save_checkpoint(out_dir, step, model, opt, sched, sampler, keep):
    from safetensors.torch import save_file
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
    s = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    if sharded:
        dist.load_sharded(os.path.join(path, "dcp"), model, opt)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in load_file(os.path.join(path, "trainable.safetensors")).items():
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


def check_output_dir(cfg):
    parent = os.path.dirname(os.path.abspath(cfg.output_dir))
    if not os.path.isdir(parent):
        raise NanotuneError(f"output_dir {cfg.output_dir!r}: its parent {parent!r} does not exist; create it or "
                            "choose another output_dir.")


def split_eval(samples, cfg, tok, build):
    """(train, eval) samples: a separate eval_file, or a seeded val_set_size hold-out."""
    if cfg.eval_file:
        return samples, build([cfg.eval_file])[0]
    if not cfg.val_set_size:
        return samples, []
    n = int(cfg.val_set_size if cfg.val_set_size >= 1 else round(cfg.val_set_size * len(samples)))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return [samples[i] for i in order[n:]], [samples[i] for i in order[:n]]


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
    """Seed, pick device/dtype, print the config, load tokenizer and model (+ LoRA / 4-bit)."""
    check_output_dir(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device, dtype = pick_device(cfg)
    device = dist.init(cfg.device) or device  # under torchrun: this rank's GPU (or CPU with gloo)
    if cfg.cuda_graphs:
        check_cuda_graphs(cfg, device)
    log(f"nanotune {type(cfg).__name__}:\n" + "\n".join(f"  {k}: {v}" for k, v in dataclasses.asdict(cfg).items()))
    cfg.model = resolve_model_path(cfg.model)
    tok = load_tokenizer(cfg.model)
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
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    dist.barrier()
    start = 0
    ckpt = find_checkpoint(cfg)
    if ckpt:
        start = load_checkpoint(ckpt, model, opt, sched, sampler)
        log(f"resumed from {ckpt} at step {start}")

    prompts = list(cfg.sample_prompts)
    if cfg.sample_prompts_file and os.path.isfile(cfg.sample_prompts_file):
        with open(cfg.sample_prompts_file) as f:
            prompts += [ln.strip() for ln in f if ln.strip()]
    if dist.is_dist():
        prompts = []  # sample generations are a single-process feature (generate.py on the result)
    before = answer_prompts(model, tok, prompts, cfg.sample_max_tokens) if prompts and not ckpt else None

    from tqdm import tqdm
    metrics = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a" if ckpt else "w") if dist.is_main() \
        else open(os.devnull, "w")
    if eval_rows and not ckpt:  # the baseline the eval curve starts from
        run_eval(model, tok, eval_rows, [], cfg, device, 0, metrics, None, task)
    bar = tqdm(total=steps, initial=start, desc=task.name, dynamic_ncols=True, file=sys.stderr,
               disable=not dist.is_main())
    tb = tensorboard(cfg.output_dir) if dist.is_main() else None
    t0, tokens_seen = time.time(), 0
    for step in range(start + 1, steps + 1):
        micro = [to_device(task.collate([rows[i] for i in rank_slice(sampler.next(), R, W)], tok), device)
                 for _ in range(cfg.grad_accum)]
        loss, gnorm, count, tokens, mets = train_step(model, opt, sched, micro, task, cfg.max_grad_norm, graph)
        tokens_seen += tokens
        tps = tokens_seen / (time.time() - t0)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        bar.update(1)
        shown = {k.split("/")[-1][:6]: f"{v:.3f}" for k, v in list(mets.items())[:3]}
        bar.set_postfix(loss=f"{loss:.4f}", **shown, lr=f"{sched.get_last_lr()[0]:.2e}", tok_s=f"{tps:.0f}",
                        mem=f"{mem:.1f}G" if mem else "-")
        if step % cfg.log_steps == 0 or step == steps:
            metrics.write(json.dumps({"step": step, "loss": loss, **mets, "lr": sched.get_last_lr()[0],
                                      "grad_norm": gnorm, "count": count, "tokens_per_s": round(tps, 1),
                                      "epoch": sampler.epoch, "peak_mem_gib": round(mem, 3)}) + "\n")
            metrics.flush()
            if tb:
                for k, v in {"loss": loss, **mets, "lr": sched.get_last_lr()[0], "grad_norm": gnorm}.items():
                    tb.add_scalar(f"train/{k}", v, step)
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step != steps:
            run_eval(model, tok, eval_rows, prompts, cfg, device, step, metrics, bar, task)
        if cfg.save_steps and step % cfg.save_steps == 0 and step != steps:
            save_checkpoint(cfg.output_dir, step, model, opt, sched, sampler, cfg.save_total_limit)
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
        metrics.write(json.dumps({"step": step, **res}) + "\n")
        (bar.write if bar else log)(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    answers = answer_prompts(model, tok, prompts, cfg.sample_max_tokens) if prompts else []
    for p, a in zip(prompts[:2], answers) if bar else []:
        bar.write(f"  [{step}] {p!r} -> {a!r}")
    return answers


def finish(model, tok, cfg, prompts, before, after):
    """Write the result (adapter or full model), the samples and a loss plot; print before/after."""
    from model import save_hf
    main_rank = dist.is_main()  # under FSDP every rank gathers, rank 0 writes
    if cfg.lora:
        result = os.path.join(cfg.output_dir, "adapter")
        lora.save_adapter(model, result, base_model_name=cfg.model, write=main_rank)
        if main_rank:
            tok.save(result)
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
        return
    rows = [json.loads(ln) for ln in open(os.path.join(out_dir, "metrics.jsonl"))]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
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
