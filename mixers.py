"""nanotune token mixers other than softmax attention, each a small module with transformers' parameter names, a
recurrent reference that is the definition (one token at a time, a state carried) and the parallel form training
runs. model.py picks a layer's mixer from its layer type. So far: LFM2's gated short convolution.

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
        T, L = v.shape[1], self.L
        prev = state.get("conv") if state is not None else None
        if prev is None:
            prev = v.new_zeros(v.shape[0], L - 1, v.shape[2])
        full = torch.cat([prev.to(v.dtype), v], 1)  # [B, L-1+T, C]: v_{t-L+1} .. v_t for every t
        if state is not None:
            state["conv"] = full[:, -(L - 1):].detach() if L > 1 else prev
        w = self.conv.weight[:, 0]  # [C, L]
        out = self.conv.bias.to(v.dtype) if self.conv.bias is not None else 0
        for i in range(L):  # tap i reaches back L-1-i tokens
            tap = full[:, i: i + T] * w[:, i].to(v.dtype)
            lag = L - 1 - i
            if docs is not None and lag:  # (the tokens before a document's start are another document's)
                same = torch.zeros_like(docs, dtype=torch.bool)
                same[:, lag:] = docs[:, lag:] == docs[:, :-lag]
                tap = tap * same[:, :, None].to(v.dtype)
            out = out + tap
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
