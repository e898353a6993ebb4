"""The chunk scan (kernels._ChunkScan) at Qwen3.5-4B's training shape, pipelined 1, 2 and 3 deep: forward and
backward ms each (CUDA events, median of 20). kernels.launch_fitting takes the deepest that fits shared memory;
deeper pipelining lowers occupancy, so this says whether the deepest is also the fastest on this GPU.
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
U, W, Kt = (torch.randn(B, N, C, d, device="cuda", generator=g) * 0.1 for d in (V, K, K))
decay = torch.rand(B, N, device="cuda", generator=g) * 0.5 + 0.5


def timed(fn, reps=20):
    ts = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts[3:])


fitting = kernels.launch_fitting
for depth in (1, 2, 3):
    def fixed(kernel, grid, args, consts, num_warps, depth=depth):
        kernel[grid](*args, **consts, num_warps=num_warps, num_stages=depth)
    kernels.launch_fitting = fixed
    leaves = [t.clone().requires_grad_() for t in (U, W, Kt, decay)]
    try:
        out = kernels.chunk_scan_triton(*leaves)
        grads = [torch.randn_like(t) for t in out]
        fwd = timed(lambda: kernels.chunk_scan_triton(*leaves))
        bwd = timed(lambda: torch.autograd.grad(kernels.chunk_scan_triton(*leaves), leaves, grads)) - fwd
        print(f"depth {depth}: forward {fwd:.3f} ms, backward {bwd:.3f} ms", flush=True)
    except triton.runtime.errors.OutOfResources as e:
        print(f"depth {depth}: does not fit ({e})", flush=True)
kernels.launch_fitting = fitting
kernels._STAGES.clear()
leaves = [t.clone().requires_grad_() for t in (U, W, Kt, decay)]
torch.autograd.grad(kernels.chunk_scan_triton(*leaves), leaves, grads)
print("launch_fitting chose:", {k[0].fn.__name__ if hasattr(k[0], "fn") else str(k[0]): v
                                for k, v in kernels._STAGES.items()})
