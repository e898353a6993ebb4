"""nanotune's channel mixers: the dense MLP (gated SwiGLU / GeGLU or plain), the stacked experts and the sparse MoE
layer with its routers (model.Config's fields choose; kernels.py runs them). model.py builds its blocks from these
(split from model.py; `cfg` is a model.Config, read by attribute only)."""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from attention import shared_input


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)) (SwiGLU / GeGLU). Plain (Phi-2): down(act(up(x)))."""

    def __init__(self, cfg, width=None):
        super().__init__()
        width = width or cfg.intermediate_size
        if cfg.gated_mlp:
            self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act, self.gated, self.width = cfg.hidden_act, cfg.gated_mlp, width
        self.tiler = None  # memory.tile_mlp: long sequences run in tiles (fn(mlp, run, x, width) -> y)
        if cfg.hidden_act == "xielu":  # Apertus: the activation has its own parameters per layer (the checkpoint's)
            self.act_fn = nn.Module()
            for n, v in (("alpha_p", [0.2034]), ("alpha_n", [-1.0502]), ("beta", 0.5), ("eps", -1e-6)):
                setattr(self.act_fn, n, nn.Parameter(torch.tensor(v), requires_grad=n.startswith("alpha")))

    def forward(self, x, residual=False):
        """residual: the caller only adds the output to the residual stream, so a recompute for backward
        may skip computing it (kernels.value_unused)."""
        if self.tiler is not None:
            return self.tiler(self, partial(self.whole, residual=residual), x, self.width)
        return self.whole(x, residual)

    def whole(self, x, residual=False):
        if self.gated:
            h = kernels.gated_act(*shared_input(x, self.gate_proj, self.up_proj), self.act)
        else:
            h = self.up_proj(x)
            h = kernels.xielu(h, *self.act_fn.parameters()) if self.act == "xielu" else PLAIN_ACTS[self.act](h)
        with kernels.value_unused(residual):
            return kernels.linear(self.down_proj, h)


PLAIN_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
              "gelu_new": partial(F.gelu, approximate="tanh"), "relu2": kernels.relu2}


def expert_act(cfg):
    """The experts' activation as kernels.moe_experts takes it: gated "silu" / tanh-GELU, gpt-oss's clamped SwiGLU
    as ("clamped", alpha, limit), or a plain one (Nemotron-H's relu^2) as ("plain", its function)."""
    if not cfg.gated_mlp:
        return ("plain", PLAIN_ACTS[cfg.hidden_act])
    return ("clamped", cfg.swiglu_alpha, cfg.swiglu_limit) if cfg.swiglu_limit else cfg.hidden_act


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights (transformers 5's layout): gate_up_proj [E, 2I, C] (gate rows first),
    down_proj [E, C, I], with gpt-oss's biases gate_up_proj_bias [E, 2I] and down_proj_bias [E, C] (families.py
    turns gpt-oss's input-major, interleaved checkpoint tensors into this layout). (quant.QuantExperts holds the
    weights in NF4 or FP8, with the same `shapes` and `dense`.)"""

    def __init__(self, cfg):
        super().__init__()
        E, I, C = cfg.num_experts, cfg.moe_intermediate_size, cfg.moe_latent_size or cfg.hidden_size
        G = 2 if cfg.gated_mlp else 1  # (Nemotron-H's plain experts: gate_up_proj holds up_proj alone, [E, I, C])
        self.shapes = {"gate_up_proj": (E, G * I, C), "down_proj": (E, C, I)}
        self.gate_up_proj = nn.Parameter(torch.empty(E, G * I, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, I))
        if cfg.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, C))
        self.act = expert_act(cfg)

    def biases(self, dtype):
        """(gate_up bias, down bias) in `dtype`, or None."""
        if not hasattr(self, "gate_up_proj_bias"):
            return None
        return self.gate_up_proj_bias.to(dtype), self.down_proj_bias.to(dtype)

    def dense(self, p, dtype=None):
        """The stacked weight `p` ("gate_up_proj" or "down_proj") as a tensor (a 4-bit one dequantizes)."""
        return getattr(self, p)

    def stack(self, p, dtype):
        """What the expert op takes for `p`: the tensor, or a function making it (kernels.stack)."""
        return self.dense(p, dtype)

    def forward(self, x, idx, w, lora=None):
        """x [N, C], idx [N, k] chosen experts, w [N, k] their weights -> sum_j w_j expert_idx_j(x)  [N, C]
        (lora: kernels.moe_experts' per-expert adapters, from lora.LoRAExperts)"""
        return kernels.moe_experts(x, idx, w, self.stack("gate_up_proj", x.dtype), self.stack("down_proj", x.dtype),
                                   self.act, lora, self.biases(x.dtype))


class MoE(nn.Module):
    """Sparse MLP: router logits -> softmax -> top-k (renormalised or not) -> the chosen experts' weighted sum,
    plus Qwen2-MoE's shared expert scaled by sigmoid(shared_expert_gate(x)). The router's load statistics of the
    last forward are kept for the load-balancing loss (`router_stats`)."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        self.experts = Experts(cfg)
        if cfg.router in ("sigmoid", "softmax_bias"):  # (chooses, weighs nothing; not trained; ERNIE's is [1, E])
            shape = (1, cfg.num_experts) if cfg.router == "softmax_bias" else (cfg.num_experts,)
            self.e_score_correction_bias = nn.Parameter(torch.zeros(shape), requires_grad=False)
        if L := cfg.moe_latent_size:  # (Nemotron-H: around the routed experts only)
            self.fc1_latent_proj = nn.Linear(cfg.hidden_size, L, bias=cfg.mlp_bias)
            self.fc2_latent_proj = nn.Linear(L, cfg.hidden_size, bias=cfg.mlp_bias)
        if cfg.shared_expert_intermediate_size or cfg.n_shared_experts:
            self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size or
                                     cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.k, self.norm_topk, self.cfg = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg  # (cfg: the model's own)
        self.router_stats, self.aux_grad = None, {}  # aux_grad["grad"]: set by Transformer.router_aux's scale()

    def forward(self, x, residual=False):
        B, T, C = x.shape
        h = x.reshape(B * T, C)
        logits, aux = self.gate(h).float(), self.cfg.router_aux_loss_coef  # [N, E] in fp32
        probs = torch.sigmoid(logits) if self.cfg.router == "sigmoid" else F.softmax(logits, dim=-1)
        if self.cfg.router == "sigmoid_input":  # Llama 4: sigmoid(top-k logits) scales each chosen expert's input
            top, idx = torch.topk(logits, self.k, dim=-1)  # [N, k]
            xs = (h[:, None] * torch.sigmoid(top).to(h.dtype)[..., None]).reshape(-1, C)  # [N k, C]
            with kernels.value_unused(residual):
                y = self.experts(xs, idx.reshape(-1, 1), h.new_ones(len(xs), 1)).view(B * T, self.k, C).sum(1)
            return (y + self.shared_expert(h)).view(B, T, C)
        if aux:  # backward adds the load-balancing loss's gradient here (Transformer.router_aux)
            probs = kernels.extra_grad(probs, self.aux_grad)
        if self.cfg.router == "sparsemixer":
            w, idx = kernels.sparsemixer(logits, self.cfg.router_jitter_noise)  # [N, 2]
        else:
            w, idx = kernels.route(probs, self.k, getattr(self, "e_score_correction_bias", None), self.cfg.n_group,
                                   self.cfg.topk_group, self.norm_topk, self.cfg.routed_scaling_factor)  # [N, k]
        if aux:  # per expert: how many choices picked it, its summed probability, the rows (kernels.moe_aux_loss)
            self.router_stats = (kernels.expert_counts(idx, probs.shape[1]), probs.sum(0).detach(), h.shape[0])
        latent = hasattr(self, "fc1_latent_proj")
        with kernels.value_unused(residual and not latent):  # a recompute may skip the experts' output
            y = self.experts(self.fc1_latent_proj(h) if latent else h, idx, w.to(h.dtype))
        y = self.fc2_latent_proj(y) if latent else y
        if hasattr(self, "shared_expert"):  # (GLM-4.5's is ungated)
            gate = torch.sigmoid(self.shared_expert_gate(h)) if hasattr(self, "shared_expert_gate") else 1
            y = y + gate * self.shared_expert(h)
        return y.view(B, T, C)
