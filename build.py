"""The model a run trains, built in order: load -> the frozen base as NF4 / FP8 / as loaded -> LoRA -> FSDP2
(under torchrun) -> where its activations live (block checkpointing, offload to the host within a budget, MLP
tiles) -> the planner's prediction of the peak memory, printed before the weights load (memory.plan on the model
built on the meta device). train.py's setup calls these; dpo.py and grpo.py share them through it.

    model = build.build_model(cfg, device, dtype)    # cfg: a train.TrainConfig (or dpo's / grpo's)
    build.plan_run(cfg, device, dtype)               # one line; --plan: the parts, then stop
"""
import copy
import os
import sys

import torch

import dist
import formats
import lora
import memory
import quant
from cli import NanotuneError
from formats import load_model
from lora import DEFAULT_TARGETS
from names import nanotune_name


def build_model(cfg, device, dtype):
    """Load -> (LoRA | full) -> checkpointing; LoRA weights stay fp32 (the precision policy)."""
    if cfg.load_in_4bit and not cfg.lora:
        raise NanotuneError("load_in_4bit needs lora true: 4-bit base weights are frozen.")
    if cfg.base_dtype == "float8":
        check_fp8(cfg, device)
    if dist.is_dist():  # torchrun: LoRA and FSDP2 on the meta model, then every rank loads only its shards
        if (cfg.checkpoint_every or 1) > 1:
            raise NanotuneError(f"checkpoint_every {cfg.checkpoint_every} is not supported under torchrun/FSDP (its "
                                "blocks are checkpointed one by one); leave it unset, or train on one GPU.")
        if cfg.load_in_4bit and cfg.use_dora:
            raise NanotuneError("DoRA over a 4-bit base is not supported under torchrun/FSDP; use LoRA, or one GPU.")
        model = load_model(cfg.model, dtype=dtype, device=device,
                           prepare=lambda m: shard_on_meta(m, cfg, device, dtype))
    else:
        model = load_model(cfg.model, dtype=dtype, device=device, prepare=base_prepare(cfg))
        add_lora(model, cfg)
    if cfg.router_aux_loss_coef is not None:
        if cfg.router_aux_loss_coef and not model.config.num_experts:
            raise NanotuneError(f"router_aux_loss_coef {cfg.router_aux_loss_coef} needs a mixture-of-experts model; "
                                f"{cfg.model} ({model.config.model_type}) has no experts: leave it unset.")
        model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
    lora.init_lora(model, cfg.seed)
    place_activations(model, cfg, device, dtype)
    return model


def base_prepare(cfg):
    """How the frozen base is held (load_model's prepare): NF4, FP8, or as loaded."""
    return quant.prepare_4bit if cfg.load_in_4bit else quant.prepare_fp8 if cfg.base_dtype == "float8" else None


def check_fp8(cfg, device):
    """--base_dtype float8: LoRA over a 16-bit checkpoint, one process, a GPU with FP8 GEMMs (or the CPU)."""
    why = ("it needs lora true (the FP8 base is frozen)" if not cfg.lora else "it replaces load_in_4bit (pick one)"
           if cfg.load_in_4bit else "torchrun / FSDP does not shard FP8 weights yet" if dist.is_dist() else None)
    if why is None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        why = f"{torch.cuda.get_device_name(device)} (compute capability {cc}) has no FP8 GEMMs (8.9+: Ada, Hopper)"
    if why:
        raise NanotuneError(f"base_dtype float8: {why}; use base_dtype auto.")


def activations(cfg, mcfg, gpu, dtype) -> dict:
    """Where the run's activations live (memory.plan's keywords): checkpointing and offload (default: on a GPU),
    the block inputs kept on the GPU so the offloaded rest fit host_memory_gib, the MLP's tile budget."""
    ckpt = gpu if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    off = gpu if cfg.offload_activations is None else cfg.offload_activations
    host = int(cfg.host_memory_gib * 2**30) if cfg.host_memory_gib is not None else None  # (0: nothing on the host)
    every = cfg.checkpoint_every or 1
    groups = -(-mcfg.num_hidden_layers // every)  # (inputs kept: one a group of `every` blocks)
    keep = memory.kept_on_device(groups, cfg.micro_batch_size, cfg.max_len, mcfg.hidden_size,
                                 dtype.itemsize, host) if ckpt and off else 0
    return dict(act_bytes=dtype.itemsize, checkpoint=ckpt, offload=off, keep=keep,
                tile_bytes=int((cfg.mlp_tile_mib or 0) * 2**20), every=every)


AUTO_TILE_MIB, HOST_SHARE = 1024, 0.8  # what the planner picks when a run would not fit: tiles, host budget


def host_bytes():
    """This machine's physical memory (Linux; None elsewhere)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose(cfg, m, dtype, cap, host):
    """The planner's choices where the settings leave them open (mlp_tile_mib, host_memory_gib, checkpoint_every
    unset): MLP tiles when the whole MLP would not fit `cap`, a host budget (the first block inputs stay on the GPU)
    when the offloaded inputs would not fit HOST_SHARE of `host`, and then, if the run still would not fit `cap`,
    checkpoints every k blocks (the fewest k that fit). Written into cfg (config.yaml records what ran); -> the
    plan, its keywords and what was chosen (lines)."""
    kw, chosen = activations(cfg, m.config, True, dtype), []
    p = memory.plan(m, cfg.micro_batch_size, cfg.max_len, **kw)
    if cfg.mlp_tile_mib is None:
        cfg.mlp_tile_mib = 0.0
        tiled = dict(kw, tile_bytes=AUTO_TILE_MIB << 20)
        if cap and p["gpu"] > cap and memory.plan(m, cfg.micro_batch_size, cfg.max_len, **tiled)["gpu"] < p["gpu"]:
            cfg.mlp_tile_mib, kw = float(AUTO_TILE_MIB), tiled
            chosen.append(f"MLP tiles of {AUTO_TILE_MIB} MiB (the whole MLP would not fit)")
    p = memory.plan(m, cfg.micro_batch_size, cfg.max_len, **kw)
    if cfg.host_memory_gib is None and host and p["host"] > HOST_SHARE * host:
        cfg.host_memory_gib = round(HOST_SHARE * host / memory.GIB, 1)
        kw = activations(cfg, m.config, True, dtype)
        chosen.append(f"the first {kw['keep']} block inputs on the GPU (the host holds {cfg.host_memory_gib:g} GiB)")
        p = memory.plan(m, cfg.micro_batch_size, cfg.max_len, **kw)
    if cfg.checkpoint_every is None:
        cfg.checkpoint_every = 1
        prev = p["gpu"]
        for k in range(2, m.config.num_hidden_layers + 1) if cap and kw["checkpoint"] and p["gpu"] > cap else ():
            cfg.checkpoint_every = k
            kk = activations(cfg, m.config, True, dtype)
            pk = memory.plan(m, cfg.micro_batch_size, cfg.max_len, **kk)
            if pk["gpu"] <= cap:
                chosen.append(f"checkpoints every {k} blocks (the block inputs would fit neither GPU nor host)")
                return pk, kk, chosen
            if pk["gpu"] >= prev:  # (past the best k: a group's backward holds more than its fewer inputs save)
                break
            prev = pk["gpu"]
        cfg.checkpoint_every = 1
    return p, kw, chosen


CHOICES = ("mlp_tile_mib", "host_memory_gib", "checkpoint_every")  # the settings choose() fills where left unset


def longest_chosen(cfg, asked, m, dtype, cap, host):
    """The longest row (tokens) that fits `cap` (and `host` bytes of host memory) with the planner's choices at that
    length (the CHOICES as the run's settings `asked` them: unset ones open)."""
    def peak(tokens):
        c = copy.copy(cfg)
        c.max_len = tokens
        c.__dict__.update(asked)
        return choose(c, m, dtype, cap, host)[0]["gpu"]
    return memory.longest(m, cfg.micro_batch_size, cap, peak=peak)


def place_activations(model, cfg, device, dtype):
    a = activations(cfg, model.config, device.type == "cuda", dtype)
    memory.checkpoint_blocks(model, a["checkpoint"], a["offload"], a["keep"], a["every"])
    memory.tile_mlp(model, a["tile_bytes"])
    model.varlen = cfg.varlen_attention


def plan_run(cfg, device, dtype):
    """memory.plan for this run (its model built on the meta device): one line; --plan: the parts and the longest
    sequence that fits, then stop; a run predicted past the GPU's memory stops before loading, saying what fits."""
    if device.type != "cuda" and cfg.dtype == "auto":  # (planned from a CPU: the GPU's default precision)
        dtype = torch.bfloat16
    m = formats.meta_model(cfg.model).to(dtype)
    if base_prepare(cfg):
        base_prepare(cfg)(m)
    add_lora(m, cfg)
    G = memory.GIB
    cap = cfg.gpu_memory_gib * G if cfg.gpu_memory_gib else torch.cuda.get_device_properties(device).total_memory \
        if device.type == "cuda" else None
    asked, host = {k: getattr(cfg, k) for k in CHOICES}, host_bytes()
    p, kw, chosen = choose(cfg, m, dtype, cap, host)  # (the plan is a GPU's)
    fits = longest_chosen(cfg, asked, m, dtype, cap, host) if cap else None
    log(f"plan: peak GPU memory {p['gpu'] / G:.1f} GiB at {cfg.micro_batch_size} x {cfg.max_len} tokens, host "
        f"{p['host'] / G:.1f} GiB" + (f"; up to {fits} tokens a row fit {cap / G:.0f} GiB" + (
            " (with the planner's choices there)" if None in asked.values() else "") if cap else "") +
        "".join(f"; chosen: {c}" for c in chosen))
    if cfg.plan:
        log("  " + ", ".join(f"{k} {v / G:.2f} GiB" for k, v in p.items() if k not in ("gpu", "host")) +
            f" (checkpointing {kw['checkpoint']} every {kw['every']} blocks, offload {kw['offload']} but the first "
            f"{kw['keep']} inputs, "
            f"MLP tiles {cfg.mlp_tile_mib:g} MiB)")
        raise SystemExit(0)
    if cap and p["gpu"] > cap:
        raise NanotuneError(f"the planner predicts a peak of {p['gpu'] / G:.1f} GiB for {cfg.micro_batch_size} x "
                            f"{cfg.max_len} tokens, more than the GPU's {cap / G:.0f} GiB; up to {fits} tokens a row "
                            "fit (max_len), or set mlp_tile_mib 1024, load_in_4bit true or a smaller micro_batch_size.")


def shard_on_meta(model, cfg, device, dtype):
    """Still on the meta device: base weights to `dtype`, LoRA (fp32) applied, FSDP2 sharding, then each rank
    allocates only its shards; load_tensors fills them (4-bit: each rank quantizes its share as it is read)."""
    model.to(dtype)
    if cfg.load_in_4bit:
        quant.prepare_4bit(model, storage=dtype)  # FSDP gathers in dtype (dist.shard)
    add_lora(model, cfg)
    dist.shard(model, device, dtype)
    memory.set_sharded(True)
    model.to_empty(device=device)


def add_lora(model, cfg):
    if cfg.lora:  # targets may use the checkpoint's names (Phi-2's dense, fc1, fc2)
        targets = cfg.lora_targets if isinstance(cfg.lora_targets, str) else [
            nanotune_name(model.config, t) for t in cfg.lora_targets]
        if targets == list(DEFAULT_TARGETS):  # (Qwen3.5's linear attention, DeepSeek's latent one: lora.MIXER_TARGETS)
            targets += [t for t in lora.MIXER_TARGETS if any(n.endswith("." + t) for n, _ in model.named_modules())]
        lora.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                        rslora=cfg.use_rslora, dora=cfg.use_dora, train_modules=cfg.train_modules)


def log(msg):
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)
