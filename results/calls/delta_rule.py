"""The gated delta rule (Gated DeltaNet, after the conv: q and k L2-normed, the chunked rule) at Qwen3.5-4B's training
shape (batch 4 x 2048, 16 key heads for 32 value heads of 128, chunk 64, no documents), forward and forward +
backward ms (CUDA events, median of 10) and peak memory above the inputs, for:
  - nanotune's Triton path (kernels.l2_norm, delta_prep, chunk_scan, chunk_out),
  - its PyTorch path (kernels.fused(False): the references),
  - flash-linear-attention's chunk_gated_delta_rule as Unsloth vendors it (fla 0.5.1; q/k L2 norm in its kernel, as
    transformers calls it), where it imports and runs (.benchsite; Unsloth's import patches torch, so it runs last).
Then the largest error of nanotune's output and gradients (every input in fp32, documents every 300 tokens) against
an fp64 run of the reference, relative to the largest value.
    python results/calls/delta_rule.py"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import kernels  # noqa: E402
import mixers  # noqa: E402

B, T, HK, H, D = 4, 2048, 16, 32, 128
gen = torch.Generator("cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
# q, k (before their norm), v, beta in bf16 as the model has them; the log-decay g in fp32
inputs = [r(B, T, HK, D).bfloat16(), r(B, T, HK, D).bfloat16(), r(B, T, H, D).bfloat16(), -r(B, T, H).abs() * 0.1,
          r(B, T, H).sigmoid().bfloat16()]
dO = r(B, T, H, D).bfloat16()


def nanotune(q, k, v, g, beta, starts=None, dtype=torch.bfloat16):
    q, k = kernels.l2_norm(q, D**-0.5), kernels.l2_norm(k)
    return mixers.delta_rule_chunked(q, k, v, g, beta, starts, None, 64, dtype)[0]


def timed(rule):
    def step(backward):
        leaves = [t.detach().requires_grad_() for t in inputs]
        o = rule(*leaves)
        if backward:
            torch.autograd.grad(o, leaves, dO)

    def median(fn, reps=10):
        ts = []
        for _ in range(reps + 2):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts[2:])
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd, both = median(lambda: step(False)), median(lambda: step(True))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return f"forward {fwd:.2f} ms, forward + backward {both:.2f} ms, peak +{peak:.2f} GiB"


for name, on in (("nanotune, Triton", True), ("nanotune, PyTorch", False)):
    with kernels.fused(on):
        print(f"{name}: {timed(nanotune)}", flush=True)
try:
    from unsloth_zoo.temporary_patches.fla_vendor import patch_vendor_fla
    patch_vendor_fla()
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def fla(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta, scale=D**-0.5, use_qk_l2norm_in_kernel=True)[0]
    print(f"fla (Unsloth's copy): {timed(fla)}", flush=True)
except Exception as e:  # (unavailable, or refused on this GPU and Triton: say which)
    print(f"fla (Unsloth's copy): not run: {type(e).__name__}: {str(e)[:300]}", flush=True)

starts = torch.zeros(B, T, dtype=torch.bool, device="cuda")
starts[:, ::300] = True
leaves64, leaves32 = ([t.to(dt).requires_grad_() for t in inputs] for dt in (torch.float64, torch.float32))
with kernels.fused(False):
    o = nanotune(*leaves64, starts=starts, dtype=torch.float64)
    truth = [o, *torch.autograd.grad(o, leaves64, dO.double())]
o = nanotune(*leaves32, starts=starts, dtype=torch.float32)
got = [o, *torch.autograd.grad(o, leaves32, dO.float())]
print(f"error of the Triton path (fp32) against fp64: "
      f"{max(((a.double() - t).abs().max() / t.abs().max()).item() for a, t in zip(got, truth)):.1e}", flush=True)
