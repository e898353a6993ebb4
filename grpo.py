"""nanotune online RL: GRPO, Dr. GRPO, DAPO and GSPO on train.py's loop, with nanotune's own rollouts (no vLLM).

    python grpo.py                                    # the bundled arithmetic task on the default model
    python grpo.py --loss dr_grpo                     # or dapo | gspo
    python grpo.py --datasets math.jsonl --rewards numeric rewards.py:fmt --reward_weights 1 0.2

Each micro-batch takes P prompts and samples G completions of each from the current policy (the LoRA adapter live
on the same base: no second copy, no weight sync), rows of different lengths decoded together with a KV cache.
Rewards r_i = sum_f w_f R_f(record, completion_i); per group of G (one prompt):
    A_i = r_i - mean_j r_j,  / (std_j r_j + 1e-4) unless scale_rewards is none          (std: unbiased, as TRL)
Per completion token t, with logp = log pi(y_t | y_<t, x), old = the same when sampled (detached), ref = the model
with adapters off (full fine-tuning: a frozen copy):
    rho_t = exp(logp_t - old_t)       GSPO: rho = exp(mean_t (logp_t - old_t)) per completion
    l_t   = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
and the loss, per loss type (Shao et al. 2024, arXiv:2402.03300; Dr. GRPO arXiv:2503.20783; DAPO
arXiv:2503.14476; GSPO arXiv:2507.18071), as TRL's GRPOTrainer aggregates it:
    grpo, gspo   mean over each completion's tokens, then over completions
    dr_grpo      sum over tokens / (completions x max_new_tokens); no std division (scale_rewards none)
    dapo         sum over tokens / all completion tokens of the step; clip-higher (eps_high 0.28); groups whose
                 rewards are all equal are dropped (dynamic sampling; their share is logged)
num_iterations mu > 1 replays each sampled batch mu times (old log-probs from when it was sampled).
mask_truncated_completions: a completion cut at max_new_tokens (no stop token) trains no token but still counts
as a completion (DAPO's overlong filtering, as TRL masks it); the share cut is logged either way (`truncated`).
log_completions: every sampled completion, one JSON line each in OUTPUT_DIR/completions.jsonl (the step, the prompt
as the model saw it, the completion, each reward function's value, the weighted reward, the advantage, cut or not;
under torchrun the main rank's); a resumed run's file is first cut back to its checkpoint's step.

Data (JSONL): {"prompt": str | [messages]} or {"messages": [...]} (the prompt), optional "answer" and any other
fields; every field reaches the reward functions. Rewards: built-ins numeric (the completion's last number equals
the answer), exact (stripped text equals the answer), format (matches --format_regex), length (-len/max_new_tokens);
or path.py:function, called as function(record, completion) -> float.
"""
import importlib.util
import json
import os
import re
import types
from dataclasses import dataclass

import torch
import torch.nn as nn

import dist
import kernels
import lora
import quant
import runs
import train
from cli import F_, NanotuneError, bundled, cli
from data import IGNORE, collate, read_records
from model import Decoding, static_decoding
from train import TrainConfig

LOSSES = ("grpo", "dr_grpo", "dapo", "gspo")
PREFILL_TOKENS = 16384  # a rollout's prompts prefill this many tokens per forward (whole rows; 8B's gate/up: 0.9 GiB)


@dataclass
class GRPOConfig(TrainConfig):
    output_dir: str = F_("out-grpo", "where checkpoints, metrics and the result go (its parent must exist)")
    datasets: list = F_([bundled("arithmetic.jsonl")], "prompt files (see the docstring)")
    loss: str = F_("grpo", "grpo | dr_grpo | dapo | gspo")
    num_generations: int = F_(8, "completions sampled per prompt (G, the group)")
    max_new_tokens: int = F_(16, "tokens sampled per completion at most")
    temperature: float = F_(1.0, "sampling temperature of the rollouts")
    top_p: float = F_(1.0, "nucleus sampling of the rollouts")
    top_k: int = F_(0, "top-k sampling of the rollouts (0: off)")
    decode_graphs: bool = F_(True, "on CUDA, replay the rollouts' decode step as a CUDA graph per 256 cached tokens")
    rollout_dense_base: bool = F_(False, "dequantize a 4-bit base once per rollout, not at every decode step (faster "
                                  "decoding; a 16-bit copy of the base held through the rollout)")
    epsilon: float | None = F_(None, "clip range below 1 (default: 0.2; GSPO 3e-4)")
    epsilon_high: float | None = F_(None, "clip range above 1 (default: epsilon; DAPO 0.28, GSPO 4e-4)")
    beta: float = F_(0.0, "KL weight toward the reference (adapters off); 0 skips the reference pass, as TRL")
    num_iterations: int = F_(1, "policy updates per sampled batch (mu)")
    scale_rewards: str | None = F_(None, "group | batch | none (default: none for dr_grpo, else group)")
    dynamic_sampling: bool | None = F_(None, "drop groups whose rewards are all equal (default: on for dapo)")
    mask_truncated_completions: bool = F_(False, "completions cut at max_new_tokens train nothing (see above)")
    log_completions: bool = F_(False, "write every sampled completion and its rewards to completions.jsonl")
    rewards: list = F_(["numeric", "format"], "reward functions: numeric | exact | format | length | path.py:fn")
    reward_weights: list = F_([1.0, 0.25], "one weight per reward")
    format_regex: str = F_(r"^\s*-?\d+\s*$", "the format reward: 1 when the whole completion matches")
    micro_batch_size: int = F_(2, "prompts per micro-batch (each gives num_generations rows)")
    lr: float = F_(5e-4, "peak learning rate (tuned for the default job)")
    epochs: float = F_(1.0, "passes over the prompts (when max_steps is 0)")
    max_steps: int = F_(60, "optimizer steps (0: from epochs)")
    val_set_size: float = F_(0.0, "prompts held out (the reward on them is the eval metric)")
    sample_prompts_file: str | None = F_(bundled("arithmetic_prompts.txt"), "file with one held-out prompt per line")


# ---------------------------------------------------------------------------------------------
# Rewards
def last_number(text):
    m = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(m[-1]) if m else None


def builtin_rewards(cfg):
    def numeric(rec, text):
        want, got = rec.get("answer"), last_number(text)
        return float(got is not None and want is not None and abs(got - float(want)) < 1e-6)
    return {"numeric": numeric, "exact": lambda rec, text: float(text.strip() == str(rec.get("answer", "")).strip()),
            "format": lambda rec, text: float(re.fullmatch(cfg.format_regex, text, re.S) is not None),
            "length": lambda rec, text: -len(text) / max(cfg.max_new_tokens, 1)}


def load_rewards(cfg):
    """[(name, function)]: built-ins by name, others as path.py:function."""
    out, builtin = [], builtin_rewards(cfg)
    for spec in cfg.rewards:
        if spec in builtin:
            out.append((spec, builtin[spec]))
            continue
        path, _, name = spec.rpartition(":")
        if not path.endswith(".py") or not os.path.isfile(path):
            raise NanotuneError(f"reward {spec!r} is neither a built-in ({', '.join(builtin)}) nor path.py:function "
                                "of an existing file.")
        mod_spec = importlib.util.spec_from_file_location(f"nanotune_reward_{len(out)}", path)
        mod = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(mod)
        except Exception as e:  # (a reward file that does not run: its own error, one line)
            raise NanotuneError(f"reward {spec!r}: {path} raised {type(e).__name__} while loading: {e}; fix the file.")
        if not callable(getattr(mod, name, None)):
            raise NanotuneError(f"reward {spec!r}: {path} has no function {name!r}.")
        out.append((name, getattr(mod, name)))
    return out


def score(rewards, weights, records, texts):
    """[N, F] rewards of each completion (record i // G's) under each function, and their weighted sum [N]."""
    per = torch.zeros(len(texts), len(rewards))
    for i, (rec, text) in enumerate(zip(records, texts)):
        for f, (name, fn) in enumerate(rewards):
            try:
                per[i, f] = float(fn(rec, text))
            except Exception as e:
                raise NanotuneError(f"{rec.get('_where', 'a record')}: reward {name!r} raised {type(e).__name__}: "
                                    f"{e} (completion {text[:60]!r}).")
    return per, per @ torch.tensor(weights, dtype=per.dtype)


def advantages(r, G, scale="group"):
    """Rewards [P*G] in groups of G -> advantages [P*G], and whether each group's rewards are all equal [P]."""
    g = r.view(-1, G)
    mean = g.mean(1, keepdim=True)
    std = g.std(1, keepdim=True) if G > 1 else torch.zeros_like(mean)  # (unbiased, as TRL's nanstd)
    if scale == "batch":
        std = r.std().expand_as(mean) if r.numel() > 1 else torch.zeros_like(mean)
    a = g - mean
    if scale != "none":
        a = a / (std + 1e-4)
    return a.reshape(-1), (g == g[:, :1]).all(1)


# ---------------------------------------------------------------------------------------------
# Rollouts: rows of different lengths, left-padded, decoded together with one KV cache
def sample_rows(logits, temperature, top_k, top_p, generators):
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else softmax(logits / T) within top-k / top-p,
    drawn as argmax(p / E), E ~ Exp(1) from each row's own generator (the Gumbel-max trick), so a row's tokens do
    not depend on which rows share its batch (or rank)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        s, order = torch.sort(logits, -1, descending=True)
        p = s.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # keep the smallest prefix whose mass reaches p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    e = torch.stack([torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=g)
                     for g in generators])
    return (logits.softmax(-1) / e).argmax(-1)


@torch.no_grad()
def rollout(model, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_k=0, top_p=1.0, seeds=None,
            graphs=None, dense=False, info=None):
    """Prompt id lists -> completion id lists (through the first stop id, if hit); seeds: one per row (sampling).
    The prompts are left-padded and masked; RoPE sees each row shifted by its padding, which changes no score
    (relative positions). graphs: decode static (Decoding; CUDA graphs on CUDA); None: on CUDA where the model
    allows (static_decoding). dense: a 4-bit base dequantized once for the rollout. The prompts prefill
    PREFILL_TOKENS at a time (whole rows; one forward under torchrun, whose forward is collective). info (a dict)
    gets the choices."""
    device = model.inv_freq.device
    if graphs is None:
        graphs = device.type == "cuda" and static_decoding(model) is None and dist.world() == 1
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    dec = Decoding(model, B, L + max_new_tokens, graphs)
    dense = dense and quant.dense_bytes(model) > 0
    if info is not None:
        info.update(graphs=graphs, dense_base=dense)
    stops = torch.tensor(sorted(stop_ids), device=device)
    seeds = seeds or torch.randint(2**62, (B,)).tolist()  # (none given: from torch's global generator)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    done, out = torch.zeros(B, dtype=torch.bool, device=device), []
    with quant.dense_base(model, dense):
        logits = dec.prefill(ids, mask, max(1, PREFILL_TOKENS // L) if dist.world() == 1 else None)
        for i in range(max_new_tokens):
            nxt = sample_rows(logits, temperature, top_k, top_p, gens)
            out.append(torch.where(done, pad_id, nxt))
            live = ~done  # (a finished row's padding hides itself)
            done = done | torch.isin(nxt, stops)
            if i % 8 == 7 and dist.all_sums([float(not bool(done.all()))])[0] == 0:  # (every 8 steps: the CPU
                break  # waits for the GPU there; under torchrun every rank decodes as many steps, its sharded
                #        forward being collective)
            if i + 1 < max_new_tokens:
                logits = dec.step(out[-1], live)
    if dec.failed and info is not None:
        info.update(graphs=False, graphs_failed=dec.failed)
    toks = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))] for row in toks]


def rollout_line(model, cfg, info):
    """The run log's line on how the rollouts decode (info: what rollout chose)."""
    failed = info.get("graphs_failed") and "its CUDA graph capture failed: " + info["graphs_failed"]
    why = "--decode_graphs false" if not cfg.decode_graphs else failed or static_decoding(model) or (
        "under torchrun each step's sharded forward is collective" if dist.world() > 1 else "CUDA graphs need CUDA")
    line = "rollouts: decode step " + ("replayed as CUDA graphs" if info["graphs"] else f"eager ({why})")
    gib = quant.dense_bytes(model) / 2**30
    if info["dense_base"]:
        line += f"; the 4-bit base dequantized once per rollout ({gib:.1f} GiB)"
    elif gib:
        line += f"; the 4-bit base dequantized at every step (--rollout_dense_base true: once per rollout, " \
                f"+{gib:.1f} GiB)"
    return line


# ---------------------------------------------------------------------------------------------
# The loss
def token_logps(model, batch):
    """log pi of every completion token [B, T-1] (0 elsewhere): position t predicts token t+1. The head runs on the
    completion positions only: a frozen plain head through the fused one (kernels.linear_token_logps), any other
    256 rows at a time, recomputed in backward; no [tokens x vocab] stays alive."""
    h = model.forward(batch["input_ids"], attention_mask=batch.get("attention_mask"))[:, :-1]  # [B, T-1, C]
    comp = batch["labels"][:, 1:] != IGNORE
    y, hs, head = batch["input_ids"][:, 1:][comp], h[comp], model.lm_head
    if type(head) is nn.Linear and not head.weight.requires_grad and len(y):
        lp = kernels.linear_token_logps(hs, head.weight, y, model.config.final_logit_softcapping, head.bias)
    else:
        lp = kernels.token_logps_ref(hs, model.logits, y)
    return torch.zeros(comp.shape, dtype=lp.dtype, device=lp.device).masked_scatter(comp, lp)


def policy_update(model, rows, prompt_len, adv, micro, kind="grpo"):
    """One on-policy gradient pass (backward only, no optimizer step) over sampled rows [B, prompt_len + N] with
    advantages [B], `micro` rows at a time: what a GRPO step's update costs (bench.py --rollout measures it)."""
    cfg = types.SimpleNamespace(epsilon=None, epsilon_high=None, beta=0.0, max_new_tokens=rows.shape[1] - prompt_len)
    labels = rows.clone()
    labels[:, :prompt_len] = IGNORE
    for i in range(0, rows.shape[0], micro):
        b = {"input_ids": rows[i: i + micro], "labels": labels[i: i + micro]}
        b["attention_mask"] = torch.ones_like(b["input_ids"])
        with torch.enable_grad():
            logp = token_logps(model, b)
            mask = (b["labels"][:, 1:] != IGNORE).to(logp.dtype)
            loss, _ = policy_loss(kind, logp, logp.detach(), None, adv[i: i + micro], mask, cfg)
            (loss.sum() / rows.shape[0]).backward()


def policy_loss(kind, logp, old, ref, adv, mask, cfg):
    """Per completion, the loss its tokens add [B] (summed, before the step's count divides it) and metrics:
    logp, old, ref, mask [B, T] (ref None when beta is 0), adv [B]."""
    eps_low = cfg.epsilon if cfg.epsilon is not None else 3e-4 if kind == "gspo" else 0.2
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else (
        0.28 if kind == "dapo" else 4e-4 if kind == "gspo" and cfg.epsilon is None else eps_low)
    n = mask.sum(-1).clamp(min=1)
    d = (logp - old) * mask
    log_w = (d.sum(-1) / n)[:, None] if kind == "gspo" else d  # GSPO: one ratio per completion
    rho = torch.exp(log_w)
    a = adv[:, None]
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(rho * a, clipped * a).expand_as(logp)
    kl = None
    if ref is not None:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = per_token + cfg.beta * kl
    summed = (per_token * mask).sum(-1)
    loss = summed if kind == "dapo" else summed / cfg.max_new_tokens if kind == "dr_grpo" else summed / n
    is_clipped = ((rho < 1 - eps_low) & (a < 0)) | ((rho > 1 + eps_high) & (a > 0))
    mets = {"clip_frac": (is_clipped.float().expand_as(logp) * mask).sum(-1) / n}
    if kl is not None:
        mets["kl"] = (kl * mask).sum(-1) / n
    return loss, mets


class GRPO:
    """The online task for train.fit: collate samples the group's rollouts and scores them; loss is the policy
    loss summed per completion (per token for DAPO); count is what the step divides by."""
    name = "grpo"
    stall = ("every group's completions scored alike, so every advantage is 0: the task is solved at these settings, "
             "or out of reach (a harder or easier prompt set, more completions or a higher temperature vary them)")

    def __init__(self, cfg, model, tok, ref_model=None):
        self.cfg, self.model, self.tok, self.ref_model = cfg, model, tok, ref_model
        self.kind, self.name = cfg.loss, cfg.loss
        self.rewards = load_rewards(cfg)
        self.weights = [float(w) for w in cfg.reward_weights]
        self.scale = cfg.scale_rewards or ("none" if cfg.loss == "dr_grpo" else "group")
        self.dynamic = cfg.dynamic_sampling if cfg.dynamic_sampling is not None else cfg.loss == "dapo"
        self.calls, self.replay, self.said, self.logged = 0, [], False, False
        if cfg.mask_truncated_completions:  # (a masked step's gradient is 0 too)
            self.stall = GRPO.stall + ("; or every completion ran to max_new_tokens and "
                                       "mask_truncated_completions left it out (see `truncated` in the log; a "
                                       "larger max_new_tokens lets them end)")

    def resume(self, step):
        """Rollout seeds follow the step, so a resumed run samples what the uninterrupted one would."""
        self.calls = step * self.cfg.grad_accum
        if self.cfg.log_completions and dist.is_main():  # (the killed run may have logged steps past its checkpoint)
            runs.truncate_log(os.path.join(self.cfg.output_dir, "completions.jsonl"), step)
            self.logged = True

    def collate(self, items, tok):
        """A micro-batch of rollouts; with num_iterations mu > 1 the step's micro-batches are sampled once and
        replayed mu - 1 more steps (the prompts the sampler hands over meanwhile are not used)."""
        ga, mu = self.cfg.grad_accum, self.cfg.num_iterations
        k, seed, step = self.calls % (mu * ga), self.cfg.seed * 1_000_003 + self.calls, self.calls // ga + 1
        self.calls += 1
        if k >= ga:
            return self.replay[k % ga]
        b = self.sample(items, tok, seed, step)  # (step: the optimizer step it is sampled for, from 1)
        self.replay = (self.replay if k else []) + [b]
        return b

    @torch.no_grad()
    def sample(self, items, tok, seed, step=0):
        cfg, G, model = self.cfg, self.cfg.num_generations, self.model
        device = model.inv_freq.device
        seeds = [(seed * 1_000_003 + x["index"]) * 1024 + j for x in items for j in range(G)]  # (a row's own, so
        was = model.training  # its rollout is the same whatever the micro-batch or rank: torchrun = one process)
        model.eval()
        try:
            prompts = [x["prompt_ids"] for x in items for _ in range(G)]
            info = {}
            comps = rollout(model, prompts, cfg.max_new_tokens, tok.stop_ids, tok.pad_id, cfg.temperature,
                            cfg.top_k, cfg.top_p, [s % 2**62 for s in seeds], None if cfg.decode_graphs else False,
                            cfg.rollout_dense_base, info)
            if not self.said:  # (once: how the rollouts decode)
                self.said = True
                train.log(rollout_line(model, cfg, info))
        finally:
            model.train(was)
        texts = [tok.decode([t for t in c if t not in tok.stop_ids]) for c in comps]
        records = [x["record"] for x in items for _ in range(G)]
        per, r = score(self.rewards, self.weights, records, texts)
        adv, flat = advantages(r, G, self.scale)
        keep = (~flat if self.dynamic else torch.ones_like(flat)).repeat_interleave(G).float()
        cut = [len(c) == cfg.max_new_tokens and c[-1] not in tok.stop_ids for c in comps]
        if cfg.log_completions and dist.is_main():
            self.log_completions(step, [tok.decode(p, False) for p in prompts], texts, per, r, adv, cut)
        mask = cfg.mask_truncated_completions
        b = collate([{"input_ids": p + c, "labels": [IGNORE] * len(p) + ([IGNORE] * len(c) if mask and x else c)}
                     for p, c, x in zip(prompts, comps, cut)], tok.pad_id)
        b = train.to_device(b, device)
        b.update(advantages=adv.to(device), keep=keep.to(device))
        if cfg.num_iterations > 1:  # (else the old log-probs are the new ones, detached)
            b["old"] = self.logps(model, b)
        if cfg.beta:
            b["ref"] = self.reference(b)
        stats = {"reward": r.sum(), "completion_len": torch.tensor(float(sum(map(len, comps)))),
                 "truncated": torch.tensor(float(sum(cut))),
                 "groups_dropped": flat.float().sum() * G if self.dynamic else torch.tensor(0.0),
                 **{f"rewards/{name}": per[:, f].sum() for f, (name, _) in enumerate(self.rewards)}}
        return {**b, **{f"stat:{k}": v.to(device) for k, v in stats.items()}}

    def log_completions(self, step, prompts, texts, per, r, adv, cut):
        """--log_completions: this batch's rows appended to completions.jsonl (a fresh run's file starts empty)."""
        names = [name for name, _ in self.rewards]
        with open(os.path.join(self.cfg.output_dir, "completions.jsonl"), "a" if self.logged else "w") as f:
            for i, (p, t) in enumerate(zip(prompts, texts)):
                row = {"step": step, "prompt": p, "completion": t, "reward": float(r[i]),
                       "rewards": runs.finite_or_none(dict(zip(names, per[i].tolist()))),
                       "advantage": float(adv[i]), "truncated": cut[i]}
                f.write(json.dumps(runs.finite_or_none(row)) + "\n")
        self.logged = True

    def logps(self, model, b):
        return model.run(token_logps, b).detach()

    @torch.no_grad()
    def reference(self, b):
        if self.ref_model is not None:
            return self.ref_model.run(token_logps, b)
        was = self.model.training
        self.model.eval()
        lora.set_lora_enabled(self.model, False)
        try:
            return self.model.run(token_logps, b)
        finally:
            lora.set_lora_enabled(self.model, True)
            self.model.train(was)

    def loss(self, model, b):
        mask = (b["labels"][:, 1:] != IGNORE).float()
        logp = model.run(token_logps, b)
        old = b["old"] if "old" in b else logp.detach()
        loss, mets = policy_loss(self.kind, logp, old, b.get("ref"), b["advantages"], mask, self.cfg)
        keep, scale = b["keep"], self.count(b) / b["input_ids"].shape[0]  # (metrics: per completion)
        out = {k: (v * keep).sum().detach() * scale for k, v in mets.items()}
        out.update({k[5:]: v * scale for k, v in b.items() if k.startswith("stat:")})
        return (loss * keep).sum(), out

    def backward(self, model, batch, norm):
        return train.backward(self, model, batch, norm)

    def count(self, b):
        if self.kind == "dapo":  # every kept completion token of the step
            return int(((b["labels"][:, 1:] != IGNORE).float().sum(-1) * b["keep"]).sum())
        return int(b["input_ids"].shape[0])

    @torch.no_grad()
    def evaluate(self, model, items, cfg, tok, device):
        """The held-out prompts' mean reward (one greedy completion each) and per reward function."""
        if not items:
            return {}
        was = model.training
        model.eval()
        try:
            comps = []
            for i in range(0, len(items), cfg.micro_batch_size * cfg.num_generations):
                chunk = items[i: i + cfg.micro_batch_size * cfg.num_generations]
                comps += rollout(model, [x["prompt_ids"] for x in chunk], cfg.max_new_tokens, tok.stop_ids,
                                 tok.pad_id, temperature=0.0, graphs=None if cfg.decode_graphs else False,
                                 dense=cfg.rollout_dense_base)
        finally:
            model.train(was)
        texts = [tok.decode([t for t in c if t not in tok.stop_ids]) for c in comps]
        per, r = score(self.rewards, self.weights, [x["record"] for x in items], texts)
        return {"eval_reward": float(r.mean()), **{f"eval_rewards/{n}": float(per[:, f].mean())
                                                   for f, (n, _) in enumerate(self.rewards)}}


# ---------------------------------------------------------------------------------------------
# Data and main
def prompt_items(cfg, tok):
    items = []
    for spec in cfg.datasets:
        for where, rec in read_records(spec if isinstance(spec, str) else spec["path"]):
            msgs = rec.get("prompt", rec.get("messages"))
            if isinstance(msgs, str):
                msgs = [{"role": "user", "content": msgs}]
            if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m
                                                            for m in msgs)):
                raise NanotuneError(f"{where}: a prompt record needs 'prompt' (a string or a list of messages) or "
                                    "'messages'.")
            ids = tok.chat(msgs, add_generation_prompt=True)
            if len(ids) + cfg.max_new_tokens > cfg.max_len:
                raise NanotuneError(f"{where}: the prompt is {len(ids)} tokens, and with max_new_tokens "
                                    f"{cfg.max_new_tokens} it outgrows max_len {cfg.max_len}; raise max_len.")
            items.append({"prompt_ids": ids, "record": {**rec, "_where": where}, "index": len(items)})
    if not items:
        raise NanotuneError(f"no prompts in {', '.join(map(str, cfg.datasets))}.")
    return items


def check(cfg):
    if cfg.loss not in LOSSES:
        raise NanotuneError(f"loss {cfg.loss!r} is not one of {', '.join(LOSSES)}.")
    if cfg.num_generations < 2:
        raise NanotuneError(f"num_generations {cfg.num_generations}: a group needs at least 2 completions to compare "
                            "(its advantages would all be 0).")
    if cfg.scale_rewards not in (None, "group", "batch", "none"):
        raise NanotuneError(f"scale_rewards {cfg.scale_rewards!r} is not group, batch or none.")
    if len(cfg.reward_weights) != len(cfg.rewards):
        raise NanotuneError(f"{len(cfg.reward_weights)} reward_weights for {len(cfg.rewards)} rewards "
                            f"({' '.join(cfg.rewards)}); give one per reward, e.g. --reward_weights "
                            f"{' '.join(['1'] * len(cfg.rewards))}.")
    if cfg.num_iterations < 1 or cfg.max_new_tokens < 1:
        raise NanotuneError("num_iterations and max_new_tokens must be at least 1.")
    if cfg.packing:
        raise NanotuneError("packing does not apply to grpo.py (the rows are sampled completions); drop --packing.")
    if cfg.rollout_dense_base and not cfg.load_in_4bit:
        raise NanotuneError("--rollout_dense_base true dequantizes a 4-bit base, and this run's base is not 4-bit; "
                            "drop it or add --load_in_4bit true.")
    if cfg.rollout_dense_base and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NanotuneError("--rollout_dense_base true dequantizes the whole base on each GPU, and under torchrun each "
                            "holds a shard of it; drop it.")


def main(argv=None):
    import copy
    cfg = train.parse_config(argv, GRPOConfig)
    check(cfg)
    model, tok, device = train.setup(cfg)
    items = prompt_items(cfg, tok)
    n_eval = int(cfg.val_set_size if cfg.val_set_size >= 1 else round(cfg.val_set_size * len(items)))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    train_items, eval_items = [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]
    train.log(f"data: {len(train_items)} prompts to train on, {len(eval_items)} held out; "
              f"{cfg.num_generations} completions each")
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta and not cfg.lora else None
    train.fit(cfg, model, tok, train_items, eval_items, GRPO(cfg, model, tok, ref_model), device)


if __name__ == "__main__":
    cli(main, train.dist.shutdown)
