"""The chunk scan (kernels._ChunkScan) at Qwen3.5-4B's training shape: its products as "ieee" fp32 (CUDA cores) and
as "tf32x3" (tensor cores, kernels.SCAN_DOT), pipelined 1, 2 and 3 deep: forward and backward ms (CUDA events, median
of 20) and the largest error of the outputs and gradients against an fp64 run of the reference, relative to the
largest value. kernels.SCAN_DEPTHS (the depths launch_fitting tries, in order) comes from this: s29-1 on an H100
found the forward fastest 1 deep and the backward 2 deep.
    python results/calls/scan_depth.py"""
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import kernels  # noqa: E402

B, N, C, K, V = 4 * 32, 2048 // 64, 64, 128, 128  # batch 4 x 2048 tokens, 32 value heads, chunk 64, heads of 128
g = torch.Generator("cuda").manual_seed(0)
U, W, Kt = (torch.randn(B, N, C, d, device="cuda", generator=g) * s for d, s in ((V, 1.0), (K, 0.1), (K, 0.1)))
decay = torch.rand(B, N, device="cuda", generator=g) * 0.5 + 0.5
grads = [torch.randn(B, N, C, V, device="cuda", generator=g), torch.randn(B, N, K, V, device="cuda", generator=g),
         torch.randn(B, K, V, device="cuda", generator=g)]


def timed(fn, reps=20):
    ts = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts[3:])


def outputs(scan, dtype):
    leaves = [t.to(dtype).requires_grad_() for t in (U, W, Kt, decay)]
    out = scan(*leaves)
    return [*out, *torch.autograd.grad(out, leaves, [t.to(dtype) for t in grads])]


truth = outputs(kernels.chunk_scan_ref, torch.float64)


def error(scan):  # the largest error of the outputs and gradients in fp32, relative to the largest true value
    return max(((a.double() - t).abs().max() / t.abs().max()).item()
               for a, t in zip(outputs(scan, torch.float32), truth))


fitting = kernels.launch_fitting
for dot in ("ieee", "tf32x3"):
    kernels.SCAN_DOT = dot
    for depth in (1, 2, 3):
        def fixed(kernel, grid, args, consts, num_warps, depths, depth=depth):
            kernel[grid](*args, **consts, num_warps=num_warps, num_stages=depth)
        kernels.launch_fitting = fixed
        leaves = [t.clone().requires_grad_() for t in (U, W, Kt, decay)]
        line = f"{dot:7s} depth {depth}:"
        try:  # forward and backward apart: a depth may fit one of them only
            fwd = timed(lambda: kernels.chunk_scan_triton(*leaves))
            line += f" forward {fwd:.3f} ms,"
            bwd = timed(lambda: torch.autograd.grad(kernels.chunk_scan_triton(*leaves), leaves, grads)) - fwd
            line += f" backward {bwd:.3f} ms, error {error(kernels.chunk_scan_triton):.1e}"
        except triton.runtime.errors.OutOfResources as e:
            line += f" the rest does not fit ({e})"
        print(line, flush=True)
kernels.launch_fitting, kernels.SCAN_DOT = fitting, "tf32x3"
kernels._STAGES.clear()
print("reference in fp32: error", error(kernels.chunk_scan_ref))
outputs(kernels.chunk_scan_triton, torch.float32)
print("launch_fitting chose:", {getattr(k[0], "__name__", str(k[0])): v for k, v in kernels._STAGES.items()})
