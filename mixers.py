"""nanotune token mixers other than softmax attention, each a small module with transformers' parameter names, a
recurrent reference that is the definition (one token at a time, a state carried) and the parallel form training
runs. model.py picks a layer's mixer from its layer type: LFM2's gated short convolution, Qwen3.5's Gated DeltaNet,
Mamba2 (Granite 4.0-H, Nemotron-H).

Gated short convolution (LFM2, transformers' Lfm2ShortConv), hidden size C, kernel L (conv_L_cache):
    B, Cg, u = split(in_proj(h), 3)          # in_proj C -> 3C; padded positions' h are zeroed first
    v   = B * u
    v'_t = bias + sum_{i < L} w_i v_{t-L+1+i}    # causal depthwise conv (w_{L-1} on the current token), no activation
    y   = out_proj(Cg * v')
Recurrent: the state is the last L-1 values of v; packed rows reset it at each document start (no tap reaches an
earlier document), so packing stays exact.
"""
import torch
import torch.nn as nn

import kernels


def causal_conv(v, w, bias, docs=None, state=None, key="conv", silu=False):
    """Causal depthwise convolution: v [B, T, C], w [C, L] (w[:, L-1] on the current token) -> [B, T, C], then
    SiLU if silu; docs [B, T]: taps never reach into an earlier document (kernels.causal_conv1d); state: a dict
    whose `key` [B, L-1, C] holds the previous tokens' v (generation), replaced by this call's last L-1."""
    if state is None:
        return kernels.causal_conv1d(v, w, bias, docs, silu)
    L = w.shape[1]
    prev = state.get(key)
    if prev is None:
        prev = v.new_zeros(v.shape[0], L - 1, v.shape[2])
    full = torch.cat([prev.to(v.dtype), v], 1)  # [B, L-1+T, C]: v_{t-L+1} .. v_t for every t
    state[key] = full[:, -(L - 1):].detach() if L > 1 else prev
    return kernels.causal_conv1d_ref(full, w, bias, silu=silu)[:, L - 1:]


class ShortConv(nn.Module):
    def __init__(self, hidden: int, kernel: int, bias: bool):
        super().__init__()
        self.L = kernel
        self.in_proj = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.conv = nn.Conv1d(hidden, hidden, kernel, groups=hidden, bias=bias, padding=kernel - 1)
        self.out_proj = nn.Linear(hidden, hidden, bias=bias)

    def gates(self, h, mask=None):
        """h [B, T, C] -> (Cg, v) [B, T, C] each; mask [B, T] (1 = real token) zeroes padded inputs, as transformers."""
        if mask is not None:
            h = h * mask[:, :, None].to(h.dtype)
        b, c, u = self.in_proj(h).chunk(3, dim=-1)
        return c, b * u

    def forward(self, h, mask=None, docs=None, state=None):
        """h [B, T, C] -> [B, T, C]. docs [B, T]: each token's document (packed rows); state: a dict whose "conv"
        [B, L-1, C] holds the previous tokens' v (generation), updated in place of the dict."""
        c, v = self.gates(h, mask)
        out = causal_conv(v, self.conv.weight[:, 0], self.conv.bias, docs, state)
        return self.out_proj(c * out)

    @torch.no_grad()
    def recurrent(self, h, mask=None):
        """The definition, one token at a time with the state carried (the reference forward is checked against)."""
        c, v = self.gates(h, mask)
        w, L = self.conv.weight[:, 0], self.L
        window = v.new_zeros(v.shape[0], L, v.shape[2])  # the last L values of v, the newest last
        ys = []
        for t in range(v.shape[1]):
            window = torch.cat([window[:, 1:], v[:, t: t + 1]], 1)
            conv = (window * w.t()[None]).sum(1) + (self.conv.bias if self.conv.bias is not None else 0)
            ys.append(self.out_proj(c[:, t] * conv))
        return torch.stack(ys, 1)


# ---------------------------------------------------------------------------------------------
# Gated DeltaNet (Qwen3.5, transformers' Qwen3_5GatedDeltaNet; Yang et al. 2024, arXiv:2412.06464). Per value head
# a state S [dk, dv]; per token, after the causal conv (+ SiLU) over [q, k, v] and q, k L2-normalised, q / sqrt(dk):
#     S  = exp(g_t) S                                   g_t = -exp(A_log) softplus(a_t + dt_bias) <= 0 (decay)
#     S += k_t (beta_t (v_t - S^T k_t))^T                beta_t = sigmoid(b_t) (the delta rule's step)
#     o_t = S^T q_t ;  y = out_proj(rmsnorm(o) * w * silu(z))
# A document start in a packed row empties S (and the conv's taps stop there), so packing stays exact.
# Chunked form (training): within a chunk of C tokens, G_i = sum_{j<=i} g_j, D_ij = exp(G_i - G_j) for j <= i in
# the same document, Gamma_i = exp(G_i) while no document starts before i (else 0), S0 the incoming state:
#     (I + M) Delta = V_beta - (K_beta * Gamma) S0,     M_ij = beta_i (k_i . k_j) D_ij, j < i
#     O   = (Q * Gamma) S0 + (Q K^T * D) Delta
#     S_C = Gamma_C S0 + (K * D_Cj)^T Delta             (Delta_i: the delta rule's update of token i)
def delta_rule_recurrent(q, k, v, g, beta, starts=None, state=None):
    """The definition, token by token (fp32): q, k [B, T, Hk, dk], v [B, T, H, dv] (H a multiple of Hk), g, beta
    [B, T, H], starts [B, T] (True at a document's first token), state [B, H, dk, dv] -> (o [B, T, H, dv], the
    final state)."""
    q, k = (t.repeat_interleave(v.shape[2] // t.shape[2], 2) for t in (q, k))  # (a key head per value head)
    B, T, H, dk = k.shape
    f = torch.promote_types(k.dtype, torch.float32)  # (fp32, or fp64 for the tests' truth)
    S = k.new_zeros(B, H, dk, v.shape[-1], dtype=f) if state is None else state.to(f)
    out = []
    for t in range(T):
        keep = torch.exp(g[:, t].to(f))[:, :, None, None]
        if starts is not None:
            keep = keep * (~starts[:, t]).to(f)[:, None, None, None]
        S = S * keep
        kt, vt = k[:, t].to(f), v[:, t].to(f)
        delta = beta[:, t].to(f)[..., None] * (vt - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., None] * delta[:, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t].to(f)))
    return torch.stack(out, 1), S


def delta_rule_chunked(q, k, v, g, beta, starts=None, state=None, chunk=64, dtype=None):
    """The same as delta_rule_recurrent, C tokens at a time (see above); q, k may have fewer heads than v (a key
    head serves H / Hk value heads). The pieces are kernels.delta_prep, chunk_scan and chunk_out (Triton on a GPU,
    PyTorch with autograd elsewhere); o in dtype (default fp32)."""
    B, T, H, dv = v.shape
    U, W, K_end, gamma_C = kernels.delta_prep(k, v, g, beta, starts, chunk)
    delta, S_in, S = kernels.chunk_scan(U, W, K_end, gamma_C, state.to(U.dtype).flatten(0, 1) if state is not None
                                        else None)
    return kernels.chunk_out(q, k, g, starts, S_in, delta, dtype), S.view(B, H, *S.shape[1:])


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) * w * silu(z) (transformers' Qwen3_5RMSNormGated: the norm in fp32, w in x's dtype)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x, z):
        return kernels.gated_rms_norm(x, z, self.weight, self.eps)  # (one Triton kernel each way on a GPU)


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden, k_heads, v_heads, dk, dv, kernel, eps, chunk=64):
        super().__init__()
        self.shape, self.chunk = (k_heads, v_heads, dk, dv), chunk
        conv = 2 * k_heads * dk + v_heads * dv
        self.in_proj_qkv = nn.Linear(hidden, conv, bias=False)
        self.in_proj_z = nn.Linear(hidden, v_heads * dv, bias=False)
        self.in_proj_b = nn.Linear(hidden, v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, v_heads, bias=False)
        self.conv1d = nn.Conv1d(conv, conv, kernel, groups=conv, bias=False, padding=kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(v_heads))
        self.A_log = nn.Parameter(torch.zeros(v_heads))
        self.norm = GatedRMSNorm(dv, eps)
        self.out_proj = nn.Linear(v_heads * dv, hidden, bias=False)

    def work_bytes(self):
        """The chunked rule's fp32 working set at its peak (one block's backward), bytes a token, for the planner
        (memory.plan): 28 dv + dk dv / C values a value head (q, k, v, their products inside a chunk, U, W, the
        outputs and their gradients; the chunk states S_in). Set by Qwen3.5's peaks on an H100 (s27-7: 4B 14.25
        GiB, 35B-A3B cut 21.87; predicted 14.32 and 22.22); the CPU reference scan, whose chunk loop autograd keeps
        per chunk, holds more (at 128 / 64: 4,179 values a head per added token, torch's profiler). Since session 30
        the rule runs in Triton kernels on a GPU that save ~700 values a head a token (A, S_in, delta, W, K_end):
        this errs high until a new peak resets it."""
        _, Hv, dk, dv = self.shape
        return 4 * Hv * (28 * dv + dk * dv // self.chunk)

    def inputs(self, h, mask=None, docs=None, state=None):
        """h [B, T, C] -> q, k [B, T, Hk, dk] (normalised, fp32), v, z
        [B, T, Hv, dv], g, beta [B, T, Hv]. mask [B, T] zeroes padded inputs, as transformers."""
        Hk, Hv, dk, dv = self.shape
        if mask is not None:
            h = h * mask[:, :, None].to(h.dtype)
        B, T, _ = h.shape
        x = causal_conv(self.in_proj_qkv(h), self.conv1d.weight[:, 0], None, docs, state, silu=True)
        q, k, v = x.split([Hk * dk, Hk * dk, Hv * dv], -1)
        q, k = (kernels.l2_norm(t.reshape(B, T, Hk, dk), s) for t, s in ((q, dk**-0.5), (k, 1.0)))  # (fp32)
        g = -self.A_log.float().exp() * torch.nn.functional.softplus(self.in_proj_a(h).float() + self.dt_bias)
        return q, k, v.reshape(B, T, Hv, dv), self.in_proj_z(h).reshape(B, T, Hv, dv), g, self.in_proj_b(h).sigmoid()

    def forward(self, h, mask=None, docs=None, state=None):
        """h [B, T, C] -> [B, T, C]; docs [B, T] (packed rows); state: a dict with "conv" and "ssm" (generation)."""
        q, k, v, z, g, beta = self.inputs(h, mask, docs, state)
        starts = None if docs is None else torch.cat([torch.zeros_like(docs[:, :1], dtype=torch.bool),
                                                      docs[:, 1:] != docs[:, :-1]], 1)
        S0 = state.get("ssm") if state is not None else None  # (one new token: the recurrent step itself)
        o, S = delta_rule_recurrent(q, k, v, g, beta, starts, S0) if q.shape[1] == 1 else delta_rule_chunked(
            q, k, v, g, beta, starts, S0, self.chunk, h.dtype)
        if state is not None:
            state["ssm"] = S.detach()
        return self.out_proj(self.norm(o.to(h.dtype, memory_format=torch.contiguous_format), z).flatten(2))

    @torch.no_grad()
    def recurrent(self, h, mask=None):
        """The definition, token by token (the chunked forward is checked against it)."""
        q, k, v, z, g, beta = self.inputs(h, mask)
        o, _ = delta_rule_recurrent(q, k, v, g, beta)
        return self.out_proj(self.norm(o.to(h.dtype), z).flatten(2))


# ---------------------------------------------------------------------------------------------
# Mamba2 (Granite 4.0-H, Nemotron-H; transformers' GraniteMoeHybridMambaLayer / NemotronHMamba2Mixer; Dao & Gu 2024,
# arXiv:2405.21060, the SSD form). nh heads of P channels, G groups of B and C (head h reads group h // (nh / G)), a
# state h [P, N] per head; per token, after the causal conv (+ SiLU) over [x, B, C]:
#     dt_t = clamp(softplus(dt_t + dt_bias), dt_limit) ;  a_t = dt_t A,  A = -exp(A_log) < 0
#     h_t  = exp(a_t) h_{t-1} + dt_t x_t B_t^T ;  y_t = h_t C_t + D x_t
#     out  = out_proj(w * groupnorm(y * silu(z)))       (the gate before the norm; an RMS norm per group of channels)
# A document start in a packed row empties h (and the conv's taps stop there), so packing stays exact.
# Chunked form (training), chunks of L tokens: A_i = sum_{j<=i} a_j in the chunk, D_ij = exp(A_i - A_j) for j <= i
# in the same document, gamma_i = exp(A_i) while no document starts before i (else 0), H the incoming state:
#     Y   = ((C B^T) * D) X_dt + gamma * (C H^T)           (X_dt: dt_t x_t)
#     H'  = gamma_L H + X_dt^T (B * D_Lj)                  (the chunk's last document only)
def ssd_recurrent(x, dt, A, B, C, starts=None, state=None):
    """The definition, token by token (fp32): x [B, T, H, P], dt [B, T, H] (after softplus and clamp), A [H] (< 0),
    B, C [B, T, G, N] (head h reads group h // (H / G)), starts [B, T] (True at a document's first token), state
    [B, H, P, N] -> (y [B, T, H, P] without D's skip, the final state)."""
    B, C = (t.repeat_interleave(x.shape[2] // t.shape[2], 2) for t in (B, C))
    f = torch.promote_types(x.dtype, torch.float32)
    Bt, T, H, P = x.shape
    h = x.new_zeros(Bt, H, P, B.shape[-1], dtype=f) if state is None else state.to(f)
    ys = []
    for t in range(T):
        keep = torch.exp(dt[:, t].to(f) * A.to(f))  # [B, H]
        if starts is not None:
            keep = keep * (~starts[:, t]).to(f)[:, None]
        xdt = x[:, t].to(f) * dt[:, t].to(f)[..., None]  # [B, H, P]
        h = h * keep[..., None, None] + xdt[..., None] * B[:, t].to(f)[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t].to(f)))
    return torch.stack(ys, 1), h


def ssd_chunked(x, dt, A, B, C, starts=None, state=None, chunk=64):
    """The same as ssd_recurrent, L tokens at a time (see above; fp32); B and C may have a head per group (each
    serving H / G heads). The scan's inputs in PyTorch, then kernels.chunk_scan and chunk_out (Triton on a GPU;
    the output within a chunk is the delta rule's with q = C, k = B, delta = X_dt, g = dt A)."""
    Bt, T, H, P = x.shape
    g = dt * A.to(dt.dtype)  # [B, T, H]: a_t, the log-decay
    xdt = kernels.in_chunks(x * dt[..., None], chunk).flatten(0, 1)  # X_dt [B H, Nc, L, P]
    K, gamma_C = kernels.chunk_ends(B, g, starts, chunk)  # B * D_Lj: the chunk's last document only
    # the chunk-to-chunk recurrence (kernels.chunk_scan, on h^T [N, P]: no W, K = B * D_Lj, U = X_dt)
    _, h_in, h = kernels.chunk_scan(xdt, None, K, gamma_C, state.to(xdt.dtype).transpose(-1, -2).flatten(0, 1)
                                    if state is not None else None)
    y = kernels.chunk_out(C, B, g, starts, h_in, xdt)  # Y = ((C B^T) o D) X_dt + gamma (C h_in)
    return y, h.view(Bt, H, *h.shape[1:]).transpose(-1, -2)


class GroupGatedRMSNorm(nn.Module):
    """w * rmsnorm(x * silu(z)) over groups of channels (transformers' GraniteMoeHybridRMSNormGated: in fp32, the gate
    before the norm)."""

    def __init__(self, dim, groups, eps):
        super().__init__()
        self.weight, self.groups, self.eps = nn.Parameter(torch.ones(dim)), groups, eps

    def forward(self, x, z):
        g = (x.float() * torch.nn.functional.silu(z.float())).unflatten(-1, (self.groups, -1))
        g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * g


class Mamba2(nn.Module):
    def __init__(self, hidden, heads, head_dim, groups, state, kernel, conv_bias, bias, eps, dt_limit=(0.0, None),
                 chunk=64):
        super().__init__()
        self.shape, self.dt_limit, self.chunk = (heads, head_dim, groups, state), dt_limit, chunk
        d_in = heads * head_dim
        conv = d_in + 2 * groups * state
        self.in_proj = nn.Linear(hidden, d_in + conv + heads, bias=bias)  # -> [z | x, B, C | dt]
        self.conv1d = nn.Conv1d(conv, conv, kernel, groups=conv, bias=conv_bias, padding=kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = GroupGatedRMSNorm(d_in, groups, eps)
        self.out_proj = nn.Linear(d_in, hidden, bias=bias)

    def work_bytes(self):
        """The chunked SSD scan's fp32 working set at its peak (one block's backward), bytes a token, for the planner
        (memory.plan): 13 P + 4.5 N + 2 P N / L + 3 L values a head (x_dt, B and C per head inside the chunked
        pieces, the in-chunk products and decays, their gradients; the chunk states). Measured with torch's profiler
        on the CPU reference path, bytes per added token (956.6 and 1,832.6 values a head at P 32 / 64, N 64 / 128,
        this +0.4% and +1.3%; tests/test_plan.py); no GPU peak of a Mamba2 family yet (on a GPU the output runs in
        a kernel that keeps less, and Gated DeltaNet's GPU peaks held ~0.9 of its reference path's: this errs high)."""
        H, P, _, N = self.shape
        return 2 * H * (26 * P + 9 * N + 4 * P * N // self.chunk + 6 * self.chunk)

    def inputs(self, h, mask=None, docs=None, state=None):
        """h [B, T, C] -> z, x [B, T, H, P], dt [B, T, H] (fp32), B, C [B, T, G, N] (per group). mask [B, T]
        zeroes padded tokens before in_proj and after the conv, as transformers."""
        H, P, G, N = self.shape
        Bt, T, _ = h.shape
        if mask is not None:
            h = h * mask[:, :, None].to(h.dtype)
        z, xbc, dt = self.in_proj(h).split([H * P, H * P + 2 * G * N, H], -1)
        xbc = causal_conv(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, docs, state, silu=True)
        if mask is not None:
            xbc = xbc * mask[:, :, None].to(xbc.dtype)
        x, B, C = xbc.split([H * P, G * N, G * N], -1)
        B, C = (t.reshape(Bt, T, G, N) for t in (B, C))
        dt = torch.nn.functional.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
        return z, x.reshape(Bt, T, H, P), dt, B, C

    def output(self, y, x, z, dtype):
        y = y + self.D.float()[:, None] * x.float()  # [B, T, H, P]
        return self.out_proj(self.norm(y.flatten(2), z).to(dtype))

    def forward(self, h, mask=None, docs=None, state=None):
        """h [B, T, C] -> [B, T, C]; docs [B, T] (packed rows); state: a dict with "conv" and "ssm" (generation)."""
        z, x, dt, B, C = self.inputs(h, mask, docs, state)
        starts = None if docs is None else torch.cat([torch.zeros_like(docs[:, :1], dtype=torch.bool),
                                                      docs[:, 1:] != docs[:, :-1]], 1)
        A = -self.A_log.float().exp()
        S0 = state.get("ssm") if state is not None else None  # (one new token: the recurrent step itself)
        y, S = ssd_recurrent(x, dt, A, B, C, starts, S0) if x.shape[1] == 1 else ssd_chunked(
            x, dt, A, B, C, starts, S0, self.chunk)
        if state is not None:
            state["ssm"] = S.detach()
        return self.output(y, x, z, h.dtype)

    @torch.no_grad()
    def recurrent(self, h, mask=None):
        """The definition, token by token (the chunked forward is checked against it)."""
        z, x, dt, B, C = self.inputs(h, mask)
        y, _ = ssd_recurrent(x, dt, -self.A_log.float().exp(), B, C)
        return self.output(y, x, z, h.dtype)
