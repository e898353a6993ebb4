"""nanotune preference training: DPO, IPO, ORPO, KTO and SimPO on train.py's loop.

    python dpo.py                                     # short DPO demo (RPO: + NLL of the chosen answers)
    python dpo.py --rpo_alpha 0                       # pure DPO, TRL's default
    python dpo.py --loss orpo                         # or ipo | kto | simpo
    python dpo.py --model ./Qwen2.5-0.5B-Instruct --datasets prefs.jsonl --beta 0.1 --lr 5e-6 --lora false

Notation: l = log pi(y|x) summed over completion tokens, l_ref the same under the reference model
(LoRA: the model with adapters off; full fine-tuning: a frozen copy; or precomputed once),
h = (l_c - l_ref_c) - (l_r - l_ref_r), sigma the logistic function.
    dpo    -log sigma(beta h); label_smoothing e > 0: -[(1-e) log sigma(beta h) - e log sigma(-beta h)]/(1-2e)
                                                              (Rafailov et al. 2023, arXiv:2305.18290)
    ipo    (h_bar - 1/(2 beta))^2, h_bar with log-ratios averaged per completion token   (arXiv:2310.12036)
    orpo   NLL(chosen) - beta log sigma(log odds(l_c_bar) - log odds(l_r_bar)), no reference   (arXiv:2403.07691)
    kto    1 - sigma(beta (r - KL)) for desirable, 1 - sigma(beta (KL - r)) for undesirable, r = l - l_ref,
           KL from mismatched (prompt, completion) pairs                                  (arXiv:2402.01306)
    simpo  -log sigma(beta (l_c_bar - l_r_bar) - gamma), per-token averages, no reference  (arXiv:2405.14734)
    rpo_alpha a > 0 (dpo, ipo): + a NLL(chosen answer), per token, as TRL's rpo_alpha      (arXiv:2404.19733)
The numbers follow TRL's implementations; metrics use TRL's names (rewards/chosen, rewards/margins, ...).

Data (JSONL): {"prompt": str, "chosen": str, "rejected": str}, or {"chosen": [messages], "rejected":
[messages]} sharing every message but the last (UltraFeedback style); KTO: {"prompt", "completion",
"label": true|false}.
"""
import copy
import json
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

import axolotl
import data
import dist
import lora
import train
from data import IGNORE, collate, read_records
from cli import F_, NanotuneError, bundled, cli, default_of
from train import TrainConfig

LOSSES = ("dpo", "ipo", "orpo", "kto", "simpo")


@dataclass
class DPOConfig(TrainConfig):
    output_dir: str = F_("out-dpo", "where checkpoints, metrics and the result go (its parent must exist)")
    datasets: list = F_([bundled("preferences.jsonl")], "preference files (see the docstring for the formats)")
    loss: str = F_("dpo", "dpo | ipo | orpo | kto | simpo")
    beta: float = F_(0.1, "beta (ORPO: lambda, IPO: tau)")
    label_smoothing: float = F_(0.0, "DPO: > 0 gives the robust variant; SimPO: epsilon")
    simpo_gamma: float = F_(0.5, "SimPO margin gamma")
    cpo_alpha: float = F_(0.0, "SimPO: weight of an NLL term on the chosen completion (0 = pure SimPO)")
    rpo_alpha: float = F_(1.0, "DPO/IPO: weight of an NLL term on the chosen completion (RPO, TRL's rpo_alpha; "
                               "tuned for the default demo like lr; 0 = pure DPO, TRL's default)")
    desirable_weight: float = F_(1.0, "KTO weight of desirable examples")
    undesirable_weight: float = F_(1.0, "KTO weight of undesirable examples")
    precompute_ref: bool = F_(False, "compute reference log-probs once before training and cache them")
    max_prompt_len: int = F_(384, "prompt tokens kept (from the end) when a pair is too long")
    lr: float = F_(5e-4, "peak learning rate (tuned for the default demo)")
    epochs: float = F_(2.0, "passes over the data (when max_steps is 0)")
    micro_batch_size: int = F_(4, "pairs (KTO: examples, at least 2) per forward")
    val_set_size: float = F_(8.0, "held-out pairs for eval rewards/accuracies")
    sample_prompts_file: str | None = F_(bundled("preference_prompts.txt"), "file with one held-out prompt per line")
    cache_dir: str | None = F_(None, "(SFT only: preference data is not cached)")
    limits = {"beta": (lambda v: 0 < v < math.inf, "a number > 0 (0.1 is usual)"),
              "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
              "simpo_gamma": (lambda v: v >= 0, "a number >= 0"), "cpo_alpha": (lambda v: v >= 0, "a number >= 0"),
              "rpo_alpha": (lambda v: 0 <= v < math.inf, "a number >= 0"),
              "desirable_weight": (lambda v: v > 0, "a number > 0"),
              "undesirable_weight": (lambda v: v > 0, "a number > 0"),
              "max_prompt_len": (lambda v: v >= 1, "a whole number >= 1"),
              "loss": (lambda v: v in LOSSES, " | ".join(LOSSES))}
    migrate = staticmethod(lambda y, path: axolotl.migrate(y, path, rl_script=True))  # (an Axolotl `rl:` YAML)


# SFT settings preference training does not use: refused when set, never silently ignored
SFT_ONLY = ("eval_file", "cache_dir", "packing", "varlen_attention", "train_on_inputs", "roles_to_train")


def check_sft_only(cfg):
    """One sentence naming an SFT setting this run set (preference pairs are neither packed nor masked by role)."""
    defaults = {f.name: default_of(f) for f in fields(cfg)}
    for k in SFT_ONLY:
        if getattr(cfg, k) not in (defaults[k], None, ""):
            raise NanotuneError(f"{k} is an SFT (train.py) setting that dpo.py does not use; remove it (pairs are "
                                "masked to the completion, held out with val_set_size, never packed).")
    for spec in cfg.datasets:
        if set(data.dataset_spec(spec)) - {"path"}:
            raise NanotuneError(f"dataset {spec!r}: type and weight are SFT (train.py) dataset keys; dpo.py reads "
                                "each file's preference format itself and every pair once: give only the path.")


# ---------------------------------------------------------------------------------------------
# Data: (prompt ids, completion ids) pairs through the chat template
def _completion(tok, prompt_msgs, answer, where):
    """Prompt ids (with the generation prompt) and completion ids (answer + end-of-turn marker)."""
    p = tok.chat(prompt_msgs, add_generation_prompt=True)
    full = tok.chat(prompt_msgs + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    if full[: len(p)] != p:
        raise NanotuneError(f"{where}: the chat template does not render the prompt as a prefix of the answer.")
    ids = full[len(p):]
    stops = tok.stop_ids
    cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))  # through the end-of-turn marker
    return p, ids[:cut]


def _prompt_msgs(prompt, where):
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return prompt
    raise NanotuneError(f"{where}: 'prompt' must be a string or a list of messages.")


def _answer(x, where, key):
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict) and x[-1].get("role") == "assistant":
        return x[-1]["content"]
    raise NanotuneError(f"{where}: {key!r} must be a string or a message list ending with an assistant message.")


def preference_pairs(path, tok, kto=False):
    """-> [{"prompt": ids, "chosen": ids, "rejected": ids}] or, for KTO, [{"prompt", "completion", "label"}]."""
    out = []
    for where, rec in read_records(path):
        if not isinstance(rec, dict):
            raise NanotuneError(f"{where}: a record must be a JSON object.")
        if kto:
            for k in ("prompt", "completion", "label"):
                if k not in rec:
                    raise NanotuneError(f"{where}: KTO record has no {k!r} (needs prompt, completion, label).")
            if not isinstance(rec["label"], bool):
                raise NanotuneError(f"{where}: KTO 'label' must be true or false, got {rec['label']!r}.")
            p, c = _completion(tok, _prompt_msgs(rec["prompt"], where), _answer(rec["completion"], where,
                                                                                  "completion"), where)
            out.append({"prompt": p, "completion": c, "label": rec["label"], "where": where})
            continue
        for k in ("chosen", "rejected"):
            if k not in rec or rec[k] in (None, "", []):
                raise NanotuneError(f"{where}: preference record has no {k!r}.")
        if "prompt" in rec:
            prompt = _prompt_msgs(rec["prompt"], where)
        elif isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list):
            prompt = rec["chosen"][:-1]
            if rec["rejected"][:-1] != prompt:
                raise NanotuneError(f"{where}: chosen and rejected conversations have different prompts; they must "
                                    "share every message but the last.")
            if not prompt:
                raise NanotuneError(f"{where}: the conversations have no prompt before the answers.")
        else:
            raise NanotuneError(f"{where}: give 'prompt' with string answers, or chosen/rejected message lists.")
        chosen, rejected = _answer(rec["chosen"], where, "chosen"), _answer(rec["rejected"], where, "rejected")
        if chosen == rejected:
            raise NanotuneError(f"{where}: chosen and rejected are identical; a pair needs two different answers.")
        p, c = _completion(tok, prompt, chosen, where)
        _, r = _completion(tok, prompt, rejected, where)
        out.append({"prompt": p, "chosen": c, "rejected": r, "where": where})
    if not out:
        raise NanotuneError(f"{path} has no records.")
    return out


def fit_length(prompt, completion, cfg):
    """Keep the prompt's end (at most max_prompt_len), then cut the completion to max_len; None = drop."""
    if len(prompt) + len(completion) <= cfg.max_len:
        return prompt, completion
    if cfg.truncation == "drop":
        return None
    prompt = prompt[-cfg.max_prompt_len:]
    return prompt, completion[: max(1, cfg.max_len - len(prompt))]


def row(prompt, completion):
    """input_ids = prompt + completion; labels mark the completion (the tokens whose log-probs count)."""
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


# ---------------------------------------------------------------------------------------------
# Log-probs and losses
def sequence_logps(model, batch):
    """Per row: (sum of completion-token log-probs [B], completion token count [B], summed NLL over all
    non-padding tokens [B] and their count [B]). Position t predicts token t+1; the head runs one row
    at a time so only [T, V] logits exist at once."""
    h = model.forward(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # [B, T, C] (in model.run)
    y = batch["input_ids"][:, 1:]
    comp = batch["labels"][:, 1:] != IGNORE  # [B, T-1] completion tokens
    real = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[:, 1:].bool()  # real tokens (ORPO)
    logp, n, nll_all, n_all = [], [], [], []
    for b in range(h.shape[0]):
        lp = torch.log_softmax(model.logits(h[b, :-1]).float(), -1).gather(-1, y[b, :, None])[:, 0]  # [T-1]
        logp.append((lp * comp[b]).sum())
        n.append(comp[b].sum())
        nll_all.append(-(lp * real[b]).sum())
        n_all.append(real[b].sum())
    return torch.stack(logp), torch.stack(n).clamp(min=1), torch.stack(nll_all), torch.stack(n_all).clamp(min=1)


def log1mexp(x):
    """log(1 - e^x) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_loss(kind, cfg, lc, lr, rc, rr, nc, nr, nll_c=None):
    """Per-pair losses [P] and metric values [P] from summed log-probs (policy lc/lr, reference rc/rr)
    and completion lengths nc/nr. `nll_c`: ORPO's / SimPO's NLL term on the chosen rows."""
    beta, eps = cfg.beta, cfg.label_smoothing
    if kind in ("dpo", "ipo"):
        h = (lc - rc) - (lr - rr) if kind == "dpo" else (lc - rc) / nc - (lr - rr) / nr
        if kind == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        else:
            loss = -((1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        ch, rj = beta * (lc - rc), beta * (lr - rr)
        mets = {}
        if cfg.rpo_alpha:  # RPO: + alpha * mean token NLL of the chosen answer
            loss = loss + cfg.rpo_alpha * nll_c
            mets = {"nll_loss": nll_c}
    elif kind == "orpo":
        ac, ar = lc / nc, lr / nr  # per-token averages
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        ratio = F.logsigmoid(log_odds)
        loss = nll_c - beta * ratio
        ch, rj = beta * ac, beta * ar
        mets = {"nll_loss": nll_c, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
    elif kind == "simpo":
        ac, ar = lc / nc, lr / nr
        z = beta * (ac - ar) - cfg.simpo_gamma
        loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        if cfg.cpo_alpha:
            loss = loss + cfg.cpo_alpha * nll_c
        ch, rj = beta * ac, beta * ar
        mets = {"nll_loss": nll_c} if nll_c is not None else {}
    else:
        raise NanotuneError(f"loss {kind!r} is not one of {', '.join(LOSSES)}.")
    mets.update({"rewards/chosen": ch, "rewards/rejected": rj, "rewards/accuracies": (ch > rj).float(),
                 "rewards/margins": ch - rj, "logps/chosen": lc, "logps/rejected": lr})
    return loss, mets


def kto_loss(cfg, l, rl, label, kl_l, kl_rl):
    """Per-example KTO losses and metric values; the KL baseline is the clamped batch mean of the
    mismatched pairs' log-ratios, detached (under torchrun the mean over every rank's micro-batch, as
    TRL gathers it across processes)."""
    d = (kl_l - kl_rl).detach()
    tot = dist.all_sum_tensor(torch.stack([d.sum(), torch.tensor(float(d.numel()), device=d.device, dtype=d.dtype)]))
    kl = (tot[0] / tot[1]).clamp(min=0)
    r = l - rl
    des = 1 - torch.sigmoid(cfg.beta * (r - kl))
    und = 1 - torch.sigmoid(cfg.beta * (kl - r))
    loss = torch.where(label, cfg.desirable_weight * des, cfg.undesirable_weight * und)
    return loss, kl, cfg.beta * r


def kto_metrics(kl, rewards, logp, label):
    """TRL's KTO metrics, as per-example values whose batch mean is the metric: class means of the
    rewards and log-probs (each class's values scaled by batch size / class size), margins, kl."""
    P = label.numel()
    d, u = label.float(), (~label).float()
    nd, nu = d.sum().clamp(min=1), u.sum().clamp(min=1)
    ch, rj = rewards * d * P / nd, rewards * u * P / nu
    return {"kl": kl.expand(P), "rewards/chosen": ch, "rewards/rejected": rj, "rewards/margins": ch - rj,
            "logps/chosen": logp * d * P / nd, "logps/rejected": logp * u * P / nu}


# ---------------------------------------------------------------------------------------------
class Preference:
    """The preference task for train.fit: a micro-batch is P pairs = 2P rows [chosen; rejected],
    the loss is summed over pairs and the step divides by the pair count."""
    name = "dpo"

    def __init__(self, cfg, model, ref_model=None):
        self.cfg, self.model, self.ref_model, self.cache = cfg, model, ref_model, None
        self.split = "train"  # which precomputed reference values (cache[split]) the items' indices point into
        self.kind = cfg.loss
        self.needs_ref = self.kind in ("dpo", "ipo", "kto")
        self.name = self.kind

    def collate(self, items, tok):
        if self.kind == "kto":
            rows = [row(x["prompt"], x["completion"]) for x in items]
            # mismatched pairs for the KL estimate: prompt i with completion i-1 (rotated within the batch)
            rows += [row(x["prompt"], items[i - 1]["completion"]) for i, x in enumerate(items)]
            b = collate(rows, tok.pad_id)
            b["label"] = torch.tensor([x["label"] for x in items])
        else:
            b = collate([row(x["prompt"], x["chosen"]) for x in items] + [row(x["prompt"], x["rejected"])
                                                                           for x in items], tok.pad_id)
        b["index"] = torch.tensor([x["index"] for x in items])
        return b

    @torch.no_grad()
    def reference(self, batch):
        """Reference log-probs [2P]: precomputed, a frozen copy, or this model with adapters off."""
        if self.cache is not None:  # [2, N] -> [chosen of the batch; rejected of the batch]
            return self.cache[self.split][:, batch["index"].cpu()].reshape(-1).to(batch["input_ids"].device)
        if self.ref_model is not None:
            return self.ref_model.run(sequence_logps, batch)[0]
        was = self.model.training
        self.model.eval()  # no dropout in the reference pass
        lora.set_lora_enabled(self.model, False)
        try:
            return self.model.run(sequence_logps, batch)[0]
        finally:
            lora.set_lora_enabled(self.model, True)
            self.model.train(was)

    def per_example(self, model, batch):
        logp, n, nll, n_all = model.run(sequence_logps, batch)
        ref = self.reference(batch) if self.needs_ref else torch.zeros_like(logp)
        P = logp.shape[0] // 2
        if self.kind == "kto":
            loss, kl, rewards = kto_loss(self.cfg, logp[:P], ref[:P], batch["label"], logp[P:], ref[P:])
            return loss, kto_metrics(kl, rewards, logp[:P], batch["label"])
        if self.kind == "orpo":
            nll_c = nll[:P] / n_all[:P]  # mean token NLL over the chosen prompt + answer
        else:
            nll_c = -logp[:P] / n[:P] if self.kind == "simpo" or self.cfg.rpo_alpha else None  # chosen answer only
        return pair_loss(self.kind, self.cfg, logp[:P], logp[P:], ref[:P], ref[P:], n[:P], n[P:], nll_c)

    def loss(self, model, batch):
        loss, mets = self.per_example(model, batch)
        return loss.sum(), {k: v.detach().float().sum() for k, v in mets.items()}

    def backward(self, model, batch, norm):
        return train.backward(self, model, batch, norm)

    def count(self, batch):
        return int(batch["index"].numel())

    @torch.no_grad()
    def evaluate(self, model, items, cfg, tok, device):
        was = model.training
        model.eval()
        sums, n, self.split = {}, 0, "eval"  # (the eval pairs are indexed from 0 too: their own cache)
        try:
            for i in range(0, len(items), cfg.micro_batch_size):
                b = train.to_device(self.collate(items[i : i + cfg.micro_batch_size], tok), device)
                loss, mets = self.per_example(model, b)
                for k, v in {"loss": loss, **mets}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.float().sum())
                n += self.count(b)
        finally:
            model.train(was)
            self.split = "train"
        return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}

    @torch.no_grad()
    def precompute(self, items, tok, device):
        """Reference log-probs of every (prompt, chosen/rejected or completion) once, indexed by item."""
        ref_c, ref_r = torch.zeros(len(items)), torch.zeros(len(items))
        for i in range(0, len(items), self.cfg.micro_batch_size):
            chunk = items[i : i + self.cfg.micro_batch_size]
            b = train.to_device(self.collate(chunk, tok), device)
            r = self.reference(b).cpu()
            P = len(chunk)
            ref_c[[x["index"] for x in chunk]], ref_r[[x["index"] for x in chunk]] = r[:P], r[P:]
        return ref_c, ref_r


def prepare(cfg, tok):
    if cfg.loss not in LOSSES:
        raise NanotuneError(f"loss {cfg.loss!r} is not one of {', '.join(LOSSES)}.")
    items, dropped = [], 0
    for spec in cfg.datasets:
        for x in preference_pairs(spec if isinstance(spec, str) else spec["path"], tok, kto=cfg.loss == "kto"):
            keys = ("completion",) if cfg.loss == "kto" else ("chosen", "rejected")
            fitted = [fit_length(x["prompt"], x[k], cfg) for k in keys]
            if any(f is None for f in fitted):
                dropped += 1
                continue
            x = dict(x, prompt=fitted[0][0], **{k: f[1] for k, f in zip(keys, fitted)})
            items.append(x)
    if not items:
        raise NanotuneError(f"every one of the {dropped} pairs is longer than max_len {cfg.max_len} and was dropped "
                            "(truncation drop); raise max_len or set truncation truncate.")
    if cfg.loss == "kto" and cfg.micro_batch_size < 2:
        raise NanotuneError("KTO's KL estimate pairs each prompt with another example's completion: use "
                            "micro_batch_size >= 2.")
    n_eval = int(cfg.val_set_size if cfg.val_set_size >= 1 else round(cfg.val_set_size * len(items)))
    if n_eval >= len(items):  # (the default holds out 8: a small file keeps at least one pair to train on)
        train.log(f"val_set_size {cfg.val_set_size:g} would hold out all {len(items)} items; holding out "
                  f"{len(items) - 1} and training on 1.")
        n_eval = len(items) - 1
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    train_items = [items[i] for i in order[n_eval:]]
    eval_items = [items[i] for i in order[:n_eval]]
    for i, x in enumerate(train_items):
        x["index"] = i
    for i, x in enumerate(eval_items):
        x["index"] = i
    return train_items, eval_items, {"items": len(items), "dropped_too_long": dropped, "train": len(train_items),
                                     "eval": len(eval_items)}


def main(argv=None):
    cfg = train.parse_config(argv, DPOConfig)
    check_sft_only(cfg)
    model, tok, device = train.setup(cfg)
    items, eval_items, stats = prepare(cfg, tok)
    train.log(f"data: {json.dumps(stats)}")
    ref_model = None
    if not cfg.lora and cfg.loss in ("dpo", "ipo", "kto"):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # full fine-tuning: a frozen copy
    task = Preference(cfg, model, ref_model)
    if cfg.precompute_ref and task.needs_ref:
        if cfg.loss == "kto":
            raise NanotuneError("precompute_ref does not apply to KTO (its KL pairs change with every batch).")
        task.cache = {split: torch.stack(task.precompute(x, tok, device)) for split, x in (("train", items),
                                                                                         ("eval", eval_items or []))}
        task.ref_model = None  # the frozen copy is no longer needed
    train.fit(cfg, model, tok, items, eval_items, task, device)


if __name__ == "__main__":
    cli(main, train.dist.shutdown)
