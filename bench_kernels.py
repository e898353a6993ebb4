"""bench.py --kernels: each Triton kernel against its PyTorch reference and torch.compile(reference), forward (+
backward) time and memory at Llama-3.1-8B sizes (split from bench.py).

    python bench.py --kernels
"""
import time

import torch


def bench_kernels():
    """Each Triton kernel vs its PyTorch reference vs torch.compile(reference): fwd+bwd time and memory."""
    import kernels
    import model
    dev, dt = "cuda", torch.bfloat16
    N, C, I, V = 4 * 2048, 4096, 14336, 128256

    def step(fn, xs):  # forward, then backward where the kernel has one
        out = fn(*xs).float().sum()
        if out.requires_grad:
            out.backward()

    def timeit(fn, *xs):
        xs = [x.detach().requires_grad_(x.is_floating_point()) for x in xs]
        for _ in range(3):
            step(fn, xs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        for _ in range(10):
            step(fn, xs)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 10 * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20

    x, w = torch.randn(N, C, device=dev, dtype=dt), torch.ones(C, device=dev, dtype=dt)
    g, u = torch.randn(N, I, device=dev, dtype=dt), torch.randn(N, I, device=dev, dtype=dt)
    h, W = torch.randn(N, C, device=dev, dtype=dt), torch.randn(V, C, device=dev, dtype=dt) * 0.02
    y = torch.randint(0, V, (N,), device=dev)
    q = torch.randn(4, 2048, 32, 128, device=dev, dtype=dt).transpose(1, 2)
    cos, sin = model.rotary(torch.arange(2048, device=dev).expand(4, -1), model.rope_inv_freq(128, 5e5, None).to(dev))
    Ws = [torch.randn(o, C, device=dev, dtype=dt) * 0.02 for o in (4096, 1024, 1024)]  # q, k, v
    wfs, ab = [lambda d, w=w: w for w in Ws], [torch.randn(16, C, device=dev) * 0.01 for _ in Ws] + [
        torch.randn(w.shape[0], 16, device=dev) * 0.01 for w in Ws]
    scan = [torch.randn(64, 64, 64, 128, device=dev) * s for s in (1, 0.01, 0.01)] + [torch.rand(64, 64, device=dev)]
    cat = lambda ys: torch.cat([t.flatten() for t in ys])  # noqa: E731  (a tuple of outputs as one tensor)
    cases = {
        "lora q/k/v [8192x4096, r=16]": (lambda x, *p: cat(kernels._LoRALinear.apply(x, wfs, [None] * 3, [2.0] * 3,
                                                                                     True, False, *p)),
                                         lambda x, *p: cat(kernels.lora_linear_ref(x, wfs, [None] * 3, [2.0] * 3,
                                                                                   p[:3], p[3:])), (h, *ab), ()),
        "rms_norm [8192x4096]": (kernels.rms_norm_triton, kernels.rms_norm_ref, (x, w), (1e-5,)),
        "swiglu [8192x14336]": (kernels.gated_act_triton, kernels.gated_act_ref, (g, u), ("silu",)),
        "rope q [4x32x2048x128]": (kernels.rope_triton, kernels.rope_ref, (q,), (cos, sin)),
        "chunk_scan [64 x 64 chunks of 64 x 128]": (lambda *a: cat(kernels.chunk_scan_triton(*a)),
                                                    lambda *a: cat(kernels.chunk_scan_ref(*a)), scan, ()),
        "fp8_rows [8192x14336] x col scales": (lambda a, c: kernels.fp8_rows_triton(a, c)[0].view(torch.uint8),
                                               lambda a, c: kernels.fp8_rows_ref(a, c)[0].view(torch.uint8),
                                               (u.detach(), torch.rand(I, device=dev) + 0.5), ()),
        "linear_ce [8192x4096 -> 128256]": (kernels.linear_cross_entropy_triton,
                                            lambda a, b, yy: torch.nn.functional.cross_entropy(
                                                (a @ b.t()).float(), yy, reduction="sum"), (h, W), (y,)),
    }
    rows = []
    for name, (tri, ref, xs, extra) in cases.items():
        r = {"kernel": name}
        for label, fn in (("triton", tri), ("reference", ref), ("compiled", torch.compile(ref))):
            try:
                r[label] = timeit(lambda *a, fn=fn: fn(*a, *extra), *xs)
            except Exception as e:  # e.g. out of memory for the unfused reference
                r[label] = (float("nan"), float("nan"))
                r[label + "_error"] = str(e).splitlines()[0][:120]
        rows.append(r)
        cols = "  ".join(f"{k}: {r[k][0]:7.2f} ms {r[k][1]:8.0f} MiB" for k in ("triton", "reference", "compiled"))
        print(f"{name:40s} " + cols, flush=True)
    return rows
