"""The chunked delta rule (mixers.delta_rule_chunked) at Qwen3.5-4B's training shape (batch 4 x 2048, 16 key heads
for 32 value heads of 128, chunk 64, documents of 300 tokens): the Triton path (kernels.delta_prep, chunk_scan,
chunk_out) against the PyTorch one (kernels.fused(False): the references and the PyTorch scan), forward and
forward + backward ms (CUDA events, median of 10; v and beta in bf16 as in the model), peak memory above the
inputs, and the largest error of the output and gradients (every input in fp32) against an fp64 run of the
reference, relative to the largest value.
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
q, k = r(B, T, HK, D) * D**-0.5, r(B, T, HK, D)
k = k / k.norm(dim=-1, keepdim=True)
inputs = [q, k, r(B, T, H, D).bfloat16(), -r(B, T, H).abs() * 0.1, r(B, T, H).sigmoid().bfloat16()]
starts = torch.zeros(B, T, dtype=torch.bool, device="cuda")
starts[:, ::300] = True
dO = r(B, T, H, D)


def run(dtype=None, backward=True):
    leaves = [t.to(dtype or t.dtype).detach().requires_grad_() for t in inputs]
    o, _ = mixers.delta_rule_chunked(*leaves, starts, None, 64, torch.float32 if dtype is None else dtype)
    return [o] + (list(torch.autograd.grad(o, leaves, dO.to(o.dtype))) if backward else [])


def timed(fn, reps=10):
    ts = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts[2:])


with kernels.fused(False):
    truth = run(torch.float64)
for name, on in (("triton", True), ("pytorch", False)):
    with kernels.fused(on):
        got = run(torch.float32)  # (all in fp32 here: the bf16 gradients of v and beta would hide the rest)
        err = max(((a.double() - t).abs().max() / t.abs().max()).item() for a, t in zip(got, truth))
        del got
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd, both = timed(lambda: run(backward=False)), timed(run)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(f"{name}: forward {fwd:.2f} ms, forward + backward {both:.2f} ms, peak +{peak:.2f} GiB, error {err:.1e}",
          flush=True)
