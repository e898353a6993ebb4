"""nanotune LoRA: low-rank adapters on a built model, saved and loaded in PEFT's format.

    y = W x + s * B A dropout(x)          A: [r, in] Kaiming-uniform, B: [out, r] zeros, s = alpha / r
    rsLoRA:  s = alpha / sqrt(r)                                         (arXiv:2312.03732)
    DoRA:    y = m / ||W + s B A||_row * (W + s B A) x,  m initialised to ||W||_row, the norm detached
                                                                          (arXiv:2402.09353)
LoRA: arXiv:2106.09685. The frozen base can be an nn.Linear or quant.py's 4-bit linear (anything with
`in_features`, `out_features`, `bias` and a `dense_weight()`/`weight`).

    from lora import apply_lora, save_adapter, load_adapter, merge_lora
    apply_lora(model, r=16, alpha=16)              # q,k,v,o,gate,up,down; everything else frozen
    save_adapter(model, "out/")                    # adapter_model.safetensors + adapter_config.json
    load_adapter(model, "out/")                    # also adapters saved by `peft`
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import dist
import kernels
from cli import NanotuneError, publish, read_json
from mlp import Experts, MoE
from quant import QuantExperts, replace_module

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIXER_TARGETS = ("in_proj_qkv", "in_proj_z", "linear_attn.out_proj",  # Qwen3.5's linear attention, DeepSeek's latent
                 "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",  # one, Mamba2's projections: the
                 "mamba.in_proj", "mamba.out_proj", "mixer.in_proj")  # defaults reach them too (Granite 4.0-H's;
#                    Nemotron-H's in_proj only: peft 0.21 refuses an adapter on out_proj for Mamba model types)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense [out, in] tensor (a 4-bit base dequantizes)."""
    return base.dense_weight() if hasattr(base, "dense_weight") else base.weight


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora=False, dora=False):
        super().__init__()
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = None
        if dora:  # m = ||W||_row, so the adapter starts as the identity
            self.lora_magnitude_vector = nn.Parameter(dense_weight(base).detach().float().norm(dim=1))
        self.merged, self.disabled = False, False
        self.merged_norm = None  # DoRA: ||W + s B A||_row when merged, which unmerge divides back out

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def pairs(self):
        """[(A, B)]: the adapter's matrices (LoRAExperts has one pair per adapted projection)."""
        return [(self.lora_A.weight, self.lora_B.weight)]

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the [out, in] update LoRA adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def dora_scale(self, weight, delta):
        """m / ||W + s B A||_row as [out]; the norm is a constant for backprop (DoRA section 4.3)."""
        norm = (weight + delta.to(weight.dtype)).float().norm(dim=1).detach()
        return self.lora_magnitude_vector / norm

    def fusable(self) -> bool:
        """Plain LoRA, active, no dropout, frozen base: kernels.lora_linear computes it (with any
        projections that share the input, see project)."""
        return (not (self.disabled or self.merged) and self.lora_magnitude_vector is None
                and isinstance(self.dropout, nn.Identity) and not getattr(self.base.weight, "requires_grad", False))

    def operand(self, dtype):
        """What the fused path multiplies by: an FP8 base as it is stored (its GEMMs run in FP8), else weight_as."""
        return self.base.float8() if hasattr(self.base, "float8") else self.weight_as(dtype)

    def weight_as(self, dtype):
        """The base weight, dense, in `dtype` (a 4-bit base dequantizes on every call)."""
        b = self.base
        return b.dense_weight(dtype) if hasattr(b, "dense_weight") else b.weight.to(dtype)

    @staticmethod
    def project_together(mods, x):
        """[m(x) for m in mods] for layers reading the same x (model.shared_input calls this): one fused
        call when all can take it; inside kernels.value_unused() a recompute skips the base GEMMs."""
        if not all(isinstance(m, LoRALinear) and m.fusable() for m in mods):
            return [m(x) for m in mods]
        return kernels.lora_linear(x, [m.operand for m in mods], [m.base.bias for m in mods],
                                   [m.scaling for m in mods], [m.lora_A.weight for m in mods],
                                   [m.lora_B.weight for m in mods], value=not kernels.skip_value())

    def forward(self, x):
        if self.fusable():
            return self.project_together([self], x)[0]
        y = self.base(x)
        if self.disabled or self.merged:
            return y
        xd = self.dropout(x)
        # fp32 master weights, compute in the activation dtype (the cast of A and B is tiny; casting x is not)
        lora = F.linear(F.linear(xd, self.lora_A.weight.to(xd.dtype)), self.lora_B.weight.to(xd.dtype)) * self.scaling
        if self.lora_magnitude_vector is None:
            return y + lora.to(y.dtype)
        # DoRA: y + (g - 1) * W xd + g * s B A xd, with g = m / ||W + s B A||
        w = dense_weight(self.base)
        g = self.dora_scale(w, self.delta_weight())
        base_out = F.linear(xd, w) if self.training and not isinstance(self.dropout, nn.Identity) else (
            y if self.base.bias is None else y - self.base.bias)
        return y + ((g - 1) * base_out + g * lora).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The fp32 [out, in] weight with the adapter folded in, leaving the base untouched:
        W + s B A, or for DoRA m / ||W + s B A||_row * (W + s B A). A 4-bit base is dequantized."""
        w = dense_weight(self.base).float() + self.delta_weight()
        if self.lora_magnitude_vector is not None:
            w = w * (self.lora_magnitude_vector / w.norm(dim=1))[:, None]
        return w

    @torch.no_grad()
    def merge(self):
        """W <- merged_weight(); the adapter then adds nothing (unmerge restores W)."""
        if self.merged:
            return
        if hasattr(self.base, "dense_weight"):
            raise NanotuneError("cannot merge into a 4-bit base in place; dequantize the model first "
                                "(export.py does this).")
        w = self.base.weight
        if self.lora_magnitude_vector is not None:
            self.merged_norm = (w.float() + self.delta_weight()).norm(dim=1)
        w.copy_(self.merged_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        w = self.base.weight
        delta = self.delta_weight()
        if self.lora_magnitude_vector is not None:
            w.copy_((w.float() * (self.merged_norm / self.lora_magnitude_vector)[:, None] - delta).to(w.dtype))
        else:
            w.sub_(delta.to(w.dtype))
        self.merged = False


class LoRAExperts(nn.Module):
    """Per-expert LoRA on mlp.Experts' stacked weights: W_e += s B_e A_e for each of the E experts, A [E, r, in]
    and B [E, out, r] per adapted projection (gate_up_proj [E, 2I, C], down_proj [E, C, I]). The kernel adds the
    low-rank term per expert's rows and never forms the [E, out, in] delta (kernels.moe_experts)."""
    PROJ = ("gate_up_proj", "down_proj")

    def __init__(self, base: Experts, projs, r: int, alpha: float, rslora=False):
        super().__init__()
        self.base, self.r, self.alpha = base, r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        dev = next(base.parameters()).device
        for p in projs:
            E, out, inp = base.shapes[p]
            a = torch.empty(E, r, inp, device=dev, dtype=torch.float32)
            if a.device.type != "meta":  # PEFT's Kaiming-uniform bound for each expert's A [r, in]
                nn.init.uniform_(a, -1 / math.sqrt(inp), 1 / math.sqrt(inp))
            self.lora_A[p] = nn.Parameter(a)
            self.lora_B[p] = nn.Parameter(torch.zeros(E, out, r, device=dev, dtype=torch.float32))
        self.lora_magnitude_vector = None  # (no DoRA on experts)
        self.merged, self.disabled = False, False

    def forward(self, x, idx, w):
        if self.disabled or self.merged:
            return self.base(x, idx, w)
        lora = []  # (A1, B1, s1, A2, B2, s2), fp32 masters cast to the activations' dtype
        for p in self.PROJ:
            lora += [self.lora_A[p].to(x.dtype), self.lora_B[p].to(x.dtype), self.scaling] if p in self.lora_A else [
                None, None, 0.0]
        return self.base(x, idx, w, tuple(lora))

    def pairs(self):
        return [(self.lora_A[p], self.lora_B[p]) for p in self.lora_A]

    def delta_weight(self, p) -> torch.Tensor:
        """s B_e A_e for every expert, [E, out, in] fp32 (merging and export only)."""
        return torch.bmm(self.lora_B[p], self.lora_A[p]) * self.scaling

    @torch.no_grad()
    def merged_weight(self, p) -> torch.Tensor:
        """The fp32 [E, out, in] weight with the adapter folded in (a 4-bit base dequantized)."""
        w = self.base.dense(p, torch.float32).float()
        return w + self.delta_weight(p) if p in self.lora_A else w

    @torch.no_grad()
    def merge(self):
        if isinstance(self.base, QuantExperts):
            raise NanotuneError("cannot merge into 4-bit or FP8 experts in place; dequantize the model first "
                                "(export.py does this).")
        if not self.merged:
            for p in self.lora_A:
                getattr(self.base, p).copy_(self.merged_weight(p))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            for p in self.lora_A:
                w = getattr(self.base, p)
                w.sub_(self.delta_weight(p).to(w.dtype))
            self.merged = False


# names a target list may use for the stacked expert weights (the hub's per-expert names, or the fused one)
EXPERT_ALIASES = {"gate_up_proj": ("gate_up_proj", "gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a list matches the last name component(s); a single string is a full-name regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r=16, alpha=16, dropout=0.0, targets=DEFAULT_TARGETS, rslora=False, dora=False,
               train_modules=(), expert_targets=None, patterns=None) -> list:
    """Freeze the model, wrap every matching linear in a LoRALinear and every mixture-of-experts block whose
    projections match in a LoRAExperts: by the names in EXPERT_ALIASES in `targets` (as Unsloth: gate_proj
    reaches the experts), or when `expert_targets` is given, only by it (PEFT's `target_parameters`, e.g.
    "mlp.experts.gate_up_proj"). `train_modules` (e.g. "lm_head") stay fully trainable. patterns: a module's last
    name -> its own (r, alpha) (PEFT's rank_pattern / alpha_pattern). Returns the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    stacks = {n for n, m in model.named_modules() if isinstance(m, Experts)}  # (quantized experts hold linears)
    names = [n for n, m in model.named_modules() if _matches(n, targets) and hasattr(m, "in_features")
             and not isinstance(m, LoRALinear) and n.rpartition(".")[0] not in stacks]
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRAExperts)}
    experts = {n: [p for p, aliases in EXPERT_ALIASES.items() if (_matches(f"{n}.{p}", list(expert_targets))
                   if expert_targets is not None else any(_matches(f"{n}.{a}", targets) for a in aliases))]
               for n, m in model.named_modules() if isinstance(m, Experts) and id(m) not in wrapped}
    experts = {n: p for n, p in experts.items() if p}
    if not targets and expert_targets is None:
        raise NanotuneError(f"lora_targets is empty; name the modules to adapt, e.g. {','.join(DEFAULT_TARGETS)}.")
    if not names and not experts:
        raise NanotuneError(f"no module matches lora targets {targets!r}; valid names include "
                            f"{', '.join(DEFAULT_TARGETS)}, lm_head.")
    params = [n for n, _ in model.named_parameters()]
    for t in train_modules:
        if not any(f".{t}." in f".{n}" for n in params):
            raise NanotuneError(f"train_modules {t!r} names no module of this model; use a module name such as "
                                "embed_tokens or lm_head.")
    if experts and (dropout or dora):
        raise NanotuneError(f"lora_dropout and DoRA are not supported on the routed experts ({next(iter(experts))} "
                            "is targeted); set lora_dropout 0 and use_dora false, or leave gate_proj/up_proj/down_proj "
                            "out of lora_targets.")
    for n in names:
        r_n, alpha_n = (patterns or {}).get(n.rsplit(".", 1)[-1], (r, alpha))
        replace_module(model, n, LoRALinear(model.get_submodule(n), r_n, alpha_n, dropout, rslora, dora))
    for n, projs in experts.items():
        replace_module(model, n, LoRAExperts(model.get_submodule(n), projs, r, alpha, rslora))
    for n, p in model.named_parameters():
        if any(f".{t}." in f".{n}" for t in train_modules):
            p.requires_grad_(True)
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             use_rslora=rslora, use_dora=dora)
    return names + list(experts)


@torch.no_grad()
def init_lora(model, seed):
    """Seeded LoRA init, identical at any world size: the same full A on every rank (Kaiming-uniform with
    a=sqrt(5), as PEFT), each rank keeping its rows when sharded; B = 0; DoRA's magnitude = the norms of
    the (local) rows of W."""
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_layers(model):
        for a, b in m.pairs():  # (A [.., r, in]: the bound is 1/sqrt(in))
            full = torch.empty(a.shape).uniform_(-a.shape[-1] ** -0.5, a.shape[-1] ** -0.5, generator=g)
            if hasattr(a, "to_local"):
                dist.assign_param(a, full)  # this rank's rows
                b.to_local().zero_()
            else:
                a.copy_(full)
        if m.lora_magnitude_vector is not None and hasattr(m.lora_magnitude_vector, "to_local"):
            m.lora_magnitude_vector.to_local().copy_(m.base.weight.to_local().float().norm(dim=1))


def lora_layers(model):
    """(name, LoRALinear or LoRAExperts) for every adapted module."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]


def coverage(model, n_all: int) -> list:
    """Log lines for the start of a run: which weights carry an adapter and what share of the model's n_all
    parameters they hold, plus a warning when routed experts exist that no adapter reaches."""
    layers = lora_layers(model)
    names = sorted(set(n.rsplit(".", 1)[-1] if isinstance(m, LoRALinear) else f"experts.{p}"
                       for n, m in layers for p in (m.lora_A if isinstance(m, LoRAExperts) else [None])))
    held = sum(m.in_features * m.out_features if isinstance(m, LoRALinear) else
               sum(math.prod(m.base.shapes[p]) for p in m.lora_A) for _, m in layers)
    lines = [f"lora: {len(layers)} modules ({', '.join(names)}); their weights hold {100 * held / n_all:.1f}% of "
             "the parameters"]
    wrapped = {id(m.base) for _, m in layers if isinstance(m, LoRAExperts)}
    bare = sum(math.prod(s) for m in model.modules() if isinstance(m, Experts) and id(m) not in wrapped
               for s in m.shapes.values())
    if bare:
        lines.append(f"warning: no adapter reaches the routed experts ({100 * bare / n_all:.0f}% of the parameters), "
                     "so they are not trained; add gate_proj, up_proj and down_proj (or gate_up_proj) to lora_targets.")
    missed = {}  # the blocks' projections no adapter reaches, by name
    for n, m in model.named_modules():
        if ".layers." in n and hasattr(m, "in_features") and not isinstance(m, LoRALinear) and not any(
                n.startswith(f"{a}.") for a, _ in layers) and not n.endswith((".lora_A", ".lora_B", ".base")):
            c, w = missed.get(n.rsplit(".", 1)[-1], (0, 0))
            missed[n.rsplit(".", 1)[-1]] = (c + 1, w + m.in_features * m.out_features)  # (how many, their size)
    big = {k: w for k, (_, w) in missed.items() if w >= 0.02 * n_all}  # (a router or a gate is left alone quietly)
    if big:
        share = 100 * sum(big.values()) / n_all
        lines.append(f"warning: no adapter reaches {', '.join(sorted(big))} ({share:.0f}% of the parameters); add "
                     "them to lora_targets if they should train.")
    return lines


def stuck(model) -> list:
    """Log lines after the first optimizer step: adapters whose B is still exactly zero (their gradient was zero:
    nothing they touch reached the loss), by name."""
    dead = [n for n, m in lora_layers(model) if all(float(b.detach().abs().max()) == 0 for _, b in m.pairs())]
    if not dead:
        return []
    return [f"warning: {len(dead)} of {len(lora_layers(model))} adapters did not move in the first step (their "
            f"gradient was zero), e.g. {', '.join(dead[:3])}; check that the samples train tokens these layers "
            "reach."]


def set_lora_enabled(model, on: bool):
    """Adapters off = the base model (the DPO reference without a second copy)."""
    for _, m in lora_layers(model):
        m.disabled = not on


def merge_lora(model, unwrap=False):
    """Fold every adapter into its base weight; with `unwrap`, put the plain base layers back."""
    for n, m in lora_layers(model):
        m.merge()
        if unwrap:
            replace_module(model, n, m.base)


def unmerge_lora(model):
    for _, m in lora_layers(model):
        m.unmerge()


# ---------------------------------------------------------------------------------------------
# PEFT format: keys "base_model.model.<module>.lora_A.weight", "...lora_B.weight", DoRA's
# "...lora_magnitude_vector"; adapter_config.json with peft_type LORA. Experts are PEFT's `target_parameters`:
# one LoRA per stacked weight, A [E*r, in] (expert-major rows) and B [out, r*E] (rank-major columns), and with
# both projections adapted PEFT nests its wrappers, so gate_up_proj's keys sit under "<experts>.base_layer.".
PEFT_PREFIX = "base_model.model."


def expert_keys(n, m: LoRAExperts):
    """(PEFT key stem, projection) for each adapted projection of the experts module `n`."""
    inner = ".base_layer" if len(m.lora_A) == 2 else ""
    return [(f"{PEFT_PREFIX}{n}{inner if p == 'gate_up_proj' else ''}", p) for p in m.lora_A]


def to_peft_experts(A, B):
    """A [E, r, in], B [E, out, r] -> PEFT's lora_A [E*r, in], lora_B [out, r*E]."""
    return A.reshape(-1, A.shape[-1]), B.permute(1, 2, 0).reshape(B.shape[1], -1)


def within_layer(name: str) -> list:
    """A module name's components after its layer index (mlp.experts; Gemma 4's experts sit in the layer itself)."""
    parts = name.split(".")
    return parts[max(i for i, x in enumerate(parts) if x.isdigit()) + 1:]


def routers(model) -> set:
    """The MoE routers' module names (PEFT adapts them as `target_parameters` "<...>.gate.weight")."""
    return {f"{n}.gate" for n, m in model.named_modules() if isinstance(m, MoE)}


def adapter_state_dict(model, dtype=None, rename=None, gate_up_rows=None, swap=False, fused=None) -> dict:
    return _adapter_tensors(model, dtype, rename, gate_up_rows, swap, fused)[0]


def _adapter_tensors(model, dtype=None, rename=None, gate_up_rows=None, swap=False, fused=None) -> tuple:
    """PEFT keys; rename: nanotune's module name -> the one PEFT sees in transformers 5's model (names.memory_name:
    Phi-2's dense, gpt-oss's mlp.router, Llama 4's feed_forward; Mixtral's block_sparse_moe is mlp in memory).
    gate_up_rows(B): gate_up's LoRA B [E, 2I, r] in the checkpoint's row order (gpt-oss interleaves). swap: the
    experts are stored [E, in, out] and transformers does not say so (Llama 4): peft's A is our B^T, its B our A^T.
    fused: the adapters of projections a checkpoint fuses -> PEFT's on the fused one (names.fuse_adapters).
    -> (the state dict, peft_linears' list)."""
    sd, linears = {}, peft_linears(model, rename, fused)
    for n, m in [(n, m) for n, m in lora_layers(model) if isinstance(m, LoRAExperts)]:
        for stem, p in expert_keys(rename(n) if rename else n, m):
            B = dist.full_tensor(m.lora_B[p])
            B = gate_up_rows(B) if gate_up_rows and p == "gate_up_proj" else B
            A = dist.full_tensor(m.lora_A[p])
            a, b = to_peft_experts(*((B.transpose(1, 2), A.transpose(1, 2)) if swap else (A, B)))
            sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = a, b
    for _, n, A, B, mag in linears:
        sd[f"{PEFT_PREFIX}{n}.lora_A.weight"], sd[f"{PEFT_PREFIX}{n}.lora_B.weight"] = A, B
        if mag is not None:
            sd[f"{PEFT_PREFIX}{n}.lora_magnitude_vector"] = mag
    sd = {k: dist.full_tensor(v) for k, v in sd.items()}  # FSDP-sharded: gather
    return {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in sd.items()}, linears


def peft_linears(model, rename=None, fused=None) -> list:
    """[(nanotune's name, PEFT's name, A, B, DoRA magnitude or None)] of the adapted linears, gathered (FSDP: every
    rank calls it), the parts of a projection the checkpoint fuses as the one fused projection PEFT sees."""
    plain = [(n, *(dist.full_tensor(t) if t is not None else None for t in (
        m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector))) for n, m in lora_layers(model)
        if isinstance(m, LoRALinear)]
    return [(n, rename(n) if rename else n, A, B, mag) for n, A, B, mag in (fused(plain) if fused else plain)]


def save_adapter(model, out_dir: str, base_model_name: str | None = None, base_path: str | None = None, dtype=None,
                 write=True, rename=None, gate_up_rows=None, swap=False, fused=None):
    """adapter_model.safetensors + adapter_config.json, each written to a temp name then renamed.
    base_model_name: what peft loads the base by (a hub id or a path); base_path: the local base nanotune
    loaded, kept in the safetensors metadata. Under FSDP every rank calls it (gathering is collective) and
    only the one with `write` writes. rename, gate_up_rows, swap, fused: as in adapter_state_dict (a fused
    projection's rank is the sum of its parts': PEFT's rank_pattern, with alpha_pattern keeping their scale)."""
    from safetensors.torch import save_file
    sd, linears = _adapter_tensors(model, dtype, rename, gate_up_rows, swap, fused)  # (collective under FSDP)
    c, layers, moe = model.lora_config, lora_layers(model), routers(model)
    ranks = {pn.rsplit(".", 1)[-1]: A.shape[0] for n, pn, A, *_ in linears if n not in moe}
    if not write:
        return
    os.makedirs(out_dir, exist_ok=True)
    targets = c["target_modules"] if isinstance(c["target_modules"], str) else sorted(ranks)
    grown = {t: k for t, k in ranks.items() if k != c["r"]}  # (fused: k parts x r)
    scale = lambda k: c["lora_alpha"] * (math.sqrt(k / c["r"]) if c["use_rslora"] else k / c["r"])  # noqa: E731
    params = sorted(set(  # mlp.experts.down_proj, mlp.gate.weight (gpt-oss: mlp.router.weight; Nemotron-H's
        ".".join(within_layer(rename(f"{n}.{p}") if rename else f"{n}.{p}"))  # gate_up_proj is its up_proj)
        for n, m in layers for p in (m.lora_A if isinstance(m, LoRAExperts) else ["weight"] if n in moe else [])))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
           "r": c["r"], "lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"],
           "target_modules": targets, "use_rslora": c["use_rslora"], "use_dora": c["use_dora"], "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
           **({"target_parameters": params} if params else {}),
           **({"rank_pattern": grown, "alpha_pattern": {t: scale(k) for t, k in grown.items()}} if grown else {})}
    tmp = os.path.join(out_dir, "adapter_model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt", **({"nanotune_base_path": base_path} if base_path else {})})
    publish(tmp, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json.tmp"), "w") as f:
        json.dump(cfg, f, indent=2)
    publish(os.path.join(out_dir, "adapter_config.json.tmp"), os.path.join(out_dir, "adapter_config.json"))


def load_adapter(model, adapter_dir: str, rename=None, gate_up_rows=None, swap=False, fused=None, fused_targets=None):
    """Apply the adapter in `adapter_dir` (saved by nanotune or by `peft`) to a plain model. rename: the
    checkpoint's module names -> nanotune's (names.nanotune_name; Phi-2 calls o_proj `dense`); gate_up_rows(B):
    gate_up's LoRA B [E, 2I, r] from the checkpoint's row order to nanotune's (gpt-oss's are interleaved); fused,
    fused_targets: an adapter on a projection the checkpoint fuses -> its parts' (names.split_adapters)."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise NanotuneError(f"{adapter_dir} has no adapter_config.json; pass a PEFT/nanotune adapter directory.")
    c = read_json(cfg_path)
    if c.get("peft_type") != "LORA":
        raise NanotuneError(f"{cfg_path}: peft_type {c.get('peft_type')!r} is not supported (LORA is).")
    rp, ap = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
    patterns = {rename(k) if rename else k: (rp.get(k, c["r"]), ap.get(k, c["lora_alpha"])) for k in {*rp, *ap}}
    if c.get("modules_to_save"):
        raise NanotuneError(f"{cfg_path}: modules_to_save is not supported (adapters only).")
    targets, params = c["target_modules"] or [], c.get("target_parameters") or []
    gates = [p[: -len(".weight")] for p in params if p.endswith(".weight")]  # peft's name for a router: gate.weight
    if isinstance(targets, str):
        targets = "|".join([f"(?:{targets})", *(rf".*\.{re.escape(g)}" for g in gates)])
    else:
        targets = [rename(t) if rename else t for t in [*targets, *gates]]
        targets, patterns = fused_targets(targets, patterns) if fused_targets else (targets, patterns)
    if isinstance(targets, str) and patterns or not isinstance(targets, str) and set(patterns) - set(targets):
        raise NanotuneError(f"{cfg_path}: rank_pattern / alpha_pattern name {sorted(patterns)}, not target modules "
                            "of this model; nanotune takes a pattern per whole module name only.")
    apply_lora(model, r=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0), targets=targets,
               rslora=c.get("use_rslora", False), dora=c.get("use_dora", False), patterns=patterns,
               expert_targets=[rename(p) if rename else p for p in params if not p.endswith(".weight")])
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise NanotuneError(f"{adapter_dir} has no adapter_model.safetensors; the adapter is incomplete.")
    try:
        sd = load_file(path)
    except Exception as e:
        raise NanotuneError(f"{path} could not be read as safetensors ({str(e).splitlines()[0][:100]}); the file is "
                            "truncated or corrupt: save the adapter again.")
    params = {f"{PEFT_PREFIX}{n}": (p, None) for n, p in model.named_parameters() if p.requires_grad}
    gate_up_Bs = set()
    for n, m in lora_layers(model):  # experts: PEFT's key -> (the parameter, its PEFT shape)
        if isinstance(m, LoRAExperts):
            for stem, p in expert_keys(n, m):
                params.pop(f"{PEFT_PREFIX}{n}.lora_A.{p}"), params.pop(f"{PEFT_PREFIX}{n}.lora_B.{p}")
                A, B = m.lora_A[p], m.lora_B[p]  # (swap: peft's lora_A holds B^T, its lora_B A^T)
                a, b = ((B, (B.shape[0] * B.shape[2], B.shape[1])), (A, (A.shape[2], A.shape[1] * A.shape[0]))) if \
                    swap else ((A, (A.shape[0] * A.shape[1], A.shape[2])), (B, (B.shape[1], B.shape[2] * B.shape[0])))
                params[f"{stem}.lora_A.weight"], params[f"{stem}.lora_B.weight"] = a, b
                if p == "gate_up_proj":
                    gate_up_Bs.add(f"{stem}.lora_B.weight")
    missing, named = set(params), {}
    for k, v in sd.items():
        name = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        name = rename(name) if rename else name
        named[name[: -len(".weight")] if name.endswith(".lora_magnitude_vector.weight") else name] = k, v
    if fused:  # (a fused projection's A and B rows -> its parts')
        named = {n: (named.get(n, (n, None))[0], v) for n, v in fused({n: v for n, (_, v) in named.items()}).items()}
    for name, (k, v) in named.items():
        if name not in params:
            raise NanotuneError(f"{adapter_dir}: adapter tensor {k!r} has no place in this model; was it trained "
                                "on another base?")
        p, peft_shape = params[name]
        if tuple(peft_shape or p.shape) != tuple(v.shape):
            raise NanotuneError(f"{adapter_dir}: {k!r} has shape {tuple(v.shape)} but this model needs "
                                f"{tuple(peft_shape or p.shape)}; the adapter belongs to another base model.")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise NanotuneError(f"{path}: tensor {k!r} holds inf/NaN values; the adapter is damaged: train it again "
                                "or use an earlier checkpoint.")
        if peft_shape:  # stacked experts: back to [E, r, in] / [E, out, r] (the inverse of to_peft_experts)
            E = p.shape[0]
            v = v.view(E, -1, v.shape[1]) if ".lora_A." in name else v.view(v.shape[0], -1, E).permute(2, 0, 1)
            v = v.transpose(1, 2) if swap else v
            if gate_up_rows and name in gate_up_Bs:
                v = gate_up_rows(v)
        with torch.no_grad():
            p.copy_(v)
        missing.discard(name)
    if missing:
        raise NanotuneError(f"{path} has no tensor {min(missing)!r}, which its adapter_config.json targets; the "
                            "adapter is incomplete: save it again.")
    return model
