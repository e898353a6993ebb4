"""Where activations live while nanotune trains: per-block checkpointing (a block keeps only its input and runs
again in backward), offload of those inputs to host memory, the LoRA cast cache, CUDA graphs of a whole step,
and the host allocator on a CPU. Applied to a built model, as LoRA is (model.py knows nothing of it):

    memory.checkpoint_blocks(model, offload=True)   # blocks recomputed in backward, their inputs on the host
    memory.checkpoint_blocks(model, every=2)        # only every 2nd block's input kept (the others run again)
    memory.checkpoint_blocks(model, False)          # every activation kept (the default of a built model)
    memory.set_sharded(True)                        # FSDP: torch.utils.checkpoint, no cached LoRA casts
"""
import contextlib
import functools
import weakref

import torch
import torch.utils.checkpoint
from torch.optim.optimizer import register_optimizer_step_post_hook

import kernels

_SHARDED = False  # FSDP shards the parameters: checkpoints through torch.utils.checkpoint, no cached casts


def set_sharded(on: bool):
    global _SHARDED
    _SHARDED = bool(on)
    kernels.set_cast_cache(None if on else cached_lora_casts)


# ---------------------------------------------------------------------------------------------
# LoRA weight casts (kernels.lora_casts), cached per optimizer step: the fused LoRA path asks for them at every
# projection call, forward, recompute and backward alike
_CASTS = {}  # id of a group's first A -> (its tensors (weakly), versions, optimizer steps, [A_1; A_2; ..], [s_i B_i])
_OPT_STEPS = [0]  # optimizer steps taken in this process (any optimizer)


def _count_step(*_):
    _OPT_STEPS[0] += 1


# Fused optimizers (AdamW(fused=True)) update parameters without bumping their version counters, so the
# cached casts are also keyed on a count of optimizer steps, kept by a global optimizer hook.
register_optimizer_step_post_hook(_count_step)


def cached_lora_casts(As, Bs, scalings, dt):
    """kernels.lora_casts, cast once per optimizer step, not once per call. An entry is stale after any
    optimizer step or any in-place change of its tensors (their versions)."""
    ts, key = (*As, *Bs), id(As[0])
    hit = _CASTS.get(key)
    if (hit is None or hit[2] != _OPT_STEPS[0] or any(r() is not t for r, t in zip(hit[0], ts))
            or hit[1] != [t._version for t in ts] or hit[3].dtype != dt):
        hit = ([weakref.ref(t) for t in ts], [t._version for t in ts], _OPT_STEPS[0],
               *kernels.lora_casts(As, Bs, scalings, dt))
        if key not in _CASTS:
            weakref.finalize(As[0], _CASTS.pop, key, None)  # the entry goes when the adapter does
        _CASTS[key] = hit
    return hit[3], hit[4]


kernels.set_cast_cache(cached_lora_casts)  # on from the first import (train.py, bench.py); FSDP: set_sharded


# ---------------------------------------------------------------------------------------------
# Per-block activation checkpointing. A checkpointed block runs once without autograd (it builds no graph and
# saves nothing but its input x), then again in backward, with autograd and inside kernels.hint("recompute"),
# and backward goes through that second run. torch.utils.checkpoint (non-reentrant) builds the whole graph in
# the first forward as well and keeps per-tensor bookkeeping: at small shapes that CPU time bounds the step.
# Under FSDP blocks keep torch.utils.checkpoint, whose recompute happens inside the outer backward where FSDP2's
# hooks expect it.
def recompute_context():
    """For torch.utils.checkpoint(..., context_fn=recompute_context): (forward ctx, recompute ctx)."""
    return contextlib.nullcontext(), kernels.hint("recompute")



def _block_grads(fn, x, dy, args, params, need_x):
    """Run fn(x, *args) again with autograd, inside the recompute hint, and go backward through it:
    -> (dx or None, d arg for each arg (None where it needs none), d param_1, ...) for the parameters that
    require grad. (An arg may need one: Gemma 4's per-layer input, the keys a KV-shared layer reuses.)"""
    x = x.detach().requires_grad_(need_x)
    need = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
    args = [a.detach().requires_grad_() if n else a for a, n in zip(args, need)]
    with torch.enable_grad(), kernels.hint("recompute"):
        y = fn(x, *args)
    gs = list(torch.autograd.grad(y, ([x] if need_x else []) + [a for a, n in zip(args, need) if n] + params, dy,
                                  allow_unused=True))
    dx = gs.pop(0) if need_x else None
    return (dx, *[gs.pop(0) if n else None for n in need], *gs)


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, opts, x, *rest):
        n, rng = opts  # rest: n args (cos, sin, mask: shared by every block), then fn's trainable params
        ctx.fn, ctx.args, ctx.params = fn, rest[:n], list(rest[n:])
        # with dropout in the block, the recompute must draw the same masks: keep the RNG state
        ctx.rng = _rng_state(x.device) if rng else None
        ctx.save_for_backward(x)  # the only tensor kept (Offload's hooks may move it to the host)
        return fn(x, *ctx.args)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=ctx.rng is not None):
            if ctx.rng is not None:
                _set_rng_state(ctx.rng, x.device)
            grads = _block_grads(ctx.fn, x, dy, ctx.args, ctx.params, ctx.needs_input_grad[2])
        return (None, None, *grads)


def checkpoint(fn, x, *args, rng=False):
    """fn(x, *args) keeping only x for backward, which runs fn again (see above). rng: fn draws random
    numbers (dropout) that the recompute must repeat."""
    if _SHARDED:
        return torch.utils.checkpoint.checkpoint(fn, x, *args, use_reentrant=False, context_fn=recompute_context)
    params = [p for p in fn.parameters() if p.requires_grad]
    return _Recompute.apply(fn, (len(args), rng), x, *args, *params)


# ---------------------------------------------------------------------------------------------
# Activation offload. With per-block checkpointing the only activation kept per block is its input x
# ([B, T, C]; 64 MiB per block for Llama-3.1-8B at 4 x 2048). Offload sends each x to pinned host memory
# on a side stream as the forward goes, and brings it back one block ahead during backward (block i-1 is
# copied while block i recomputes), so the GPU holds about two block inputs instead of all of them.
# Host buffers are kept per block and reused every step. The last block is not offloaded (backward needs
# it first), and the one before it starts coming back as soon as forward ends. On CPU the copies are plain.
class Offload:
    _host: dict = {}  # block index -> flat uint8 host buffer (pinned on CUDA), grown on demand
    _side: dict = {}  # device -> side stream

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda and str(device) not in Offload._side:
            Offload._side[str(device)] = torch.cuda.Stream(device)
        self.side = Offload._side.get(str(device))
        self.items = []  # per block, in forward order: host copy, shape, dtype, GPU copy, ready event

    def _host_view(self, i, t):
        n = t.numel() * t.element_size()
        buf = Offload._host.get(i)
        if buf is None or buf.numel() < n:
            buf = Offload._host[i] = torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)
        return buf[:n].view(t.dtype).view(t.shape)

    def _fetch(self, i):
        """Copy block i's input back on the side stream; the main stream waits for `ready` before using it."""
        it = self.items[i]
        it["gpu"] = torch.empty(it["host"].shape, dtype=it["host"].dtype, device=it["device"])
        if not self.cuda:
            it["gpu"].copy_(it["host"])
            return
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            it["gpu"].copy_(it["host"], non_blocking=True)
            it["ready"] = torch.cuda.Event()
            it["ready"].record()
        if not torch.cuda.is_current_stream_capturing():  # an abandoned backward may not free memory the copy
            it["gpu"].record_stream(self.side)             # still writes (a capture would keep it to the end)

    def _release(self, i):
        """Drop block i's device input once the main stream has waited for its copy to the host. (Not
        record_stream: inside a CUDA graph capture the allocator defers such frees to the capture's end,
        which would keep every block input alive.) Called a block later, when the copy is long done."""
        it = self.items[i] if 0 <= i < len(self.items) else None
        if it is not None and it.get("x") is not None:
            torch.cuda.current_stream().wait_event(it["copied"])
            it["x"] = None

    def prefetch_last(self):
        if self.cuda:
            for i in range(len(self.items)):
                self._release(i)
        if self.items and self.items[-1] is not None:
            self._fetch(len(self.items) - 1)

    def saving(self, x):
        """Context for checkpointing one block whose input is x: x, as saved, goes to the host."""
        i, ptr, shape = len(self.items), x.data_ptr(), x.shape  # not x itself: the hooks must not keep it
        self.items.append(None)

        def pack(t):
            if t.data_ptr() != ptr or t.shape != shape:
                return t  # cos/sin/mask: shared by every block, tiny
            host = self._host_view(i, t)
            self.items[i] = {"host": host, "device": t.device, "gpu": None}
            if self.cuda:
                self.side.wait_stream(torch.cuda.current_stream())  # x is computed
                with torch.cuda.stream(self.side):
                    host.copy_(t, non_blocking=True)
                    self.items[i]["copied"] = torch.cuda.Event()
                    self.items[i]["copied"].record()
                self.items[i]["x"] = t  # kept until the main stream has waited for the copy (_release)
                self._release(i - 1)
            else:
                host.copy_(t)
            return i

        def unpack(h):
            if not isinstance(h, int):
                return h
            it = self.items[h]
            if it["gpu"] is None:  # not prefetched (the last block, or a second backward)
                self._fetch(h)
            if self.cuda:
                torch.cuda.current_stream().wait_event(it["ready"])
            x_back, it["gpu"] = it["gpu"], None
            if h > 0 and self.items[h - 1] is not None:
                self._fetch(h - 1)  # backward runs the blocks in reverse: the previous one is next
            return x_back

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class BlockCheckpoints:
    """model.block_memory, set by checkpoint_blocks: in training, each block keeps only its input (on the host
    with offload) and runs again in backward; with every=k only each k-th block's input is kept (_Group).
    begin() starts one forward pass (its own offload buffers)."""

    def __init__(self, offload, keep=0, every=1):
        self.offload, self.keep, self.every = offload, keep, every

    def begin(self, device, rng):
        """rng: the blocks draw random numbers (dropout) that the recompute must repeat."""
        return _Pass(Offload(device) if self.offload else None, rng, self.keep, self.every)


# Checkpointing every k blocks (a host budget too small for every block input, or a GPU too small to keep the
# rest): a group of k blocks keeps only its first block's input. Forward runs the blocks without autograd; backward
# runs blocks 1..k-1 of the group again without autograd to get their inputs back (k - 1 block inputs alive on the
# device for a moment), then each block's backward as a checkpointed block's (_block_grads), last block first. The
# price: one more forward of the blocks inside a group; the gain: L / k kept inputs instead of L.
class _Group(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, y, x, *tensors):
        """group: [(block fn, its args, its trainable parameters, RNG state before it or None)] in forward order,
        already run from x to y (no autograd); tensors: those args and parameters that need gradients, each once."""
        ctx.group, ctx.tensors = group, tensors
        ctx.save_for_backward(x)  # the only tensor kept (Offload's hooks may move it to the host)
        return y.detach()

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        where = {id(t): i for i, t in enumerate(ctx.tensors)}  # (cos / sin are shared: their gradients add up)
        grads = [None] * len(ctx.tensors)
        rng = any(st is not None for *_, st in ctx.group)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=rng):
            xs = [x]
            with torch.no_grad():  # the inputs of blocks 1..k-1 again
                for fn, args, _, st in ctx.group[:-1]:
                    if st is not None:
                        _set_rng_state(st, x.device)
                    xs.append(fn(xs[-1], *args))
            for j in range(len(ctx.group) - 1, -1, -1):
                fn, args, params, st = ctx.group[j]
                if st is not None:
                    _set_rng_state(st, x.device)
                need_x = j > 0 or ctx.needs_input_grad[2]
                dx, *gs = _block_grads(fn, xs.pop(), dy, args, params, need_x)
                for t, g in zip([*args, *params], gs):  # (None for an arg that needs no gradient)
                    if g is not None:
                        i = where[id(t)]
                        grads[i] = g if grads[i] is None else grads[i] + g
                dy = dx
        return (None, None, dy, *grads)


class _Pass:
    def __init__(self, offload, rng, keep=0, every=1):
        self.off, self.rng, self.keep, self.every, self.n = offload, rng, keep, every, 0
        self.group, self.x = [], None  # (every > 1) the open group's blocks and its input

    def block(self, layer, x, *args, last=False):
        if self.every > 1 and not _SHARDED:  # (FSDP: per block, its recompute inside the outer backward)
            return self._grouped(layer, x, args, last)
        self.n += 1  # (the first `keep` blocks keep their inputs on the device: a host-memory budget)
        with self.off.saving(x) if self.off and not last and self.n > self.keep else contextlib.nullcontext():
            return checkpoint(layer, x, *args, rng=self.rng)

    def _grouped(self, layer, x, args, last):
        if not self.group:
            self.x = x
        st = _rng_state(x.device) if self.rng else None
        with torch.no_grad():
            y = layer(x, *args)
        self.group.append((layer, args, [p for p in layer.parameters() if p.requires_grad], st))
        return self.close(y, last) if len(self.group) == self.every or last else y

    def close(self, y, last=False):
        """End the open group at its output y (-> y with the group's autograd node). model.py calls it before a
        block that runs outside checkpointing (Gemma 4's key-value stores)."""
        if not self.group:
            return y
        group, x, self.group, self.x = self.group, self.x, [], None
        self.n += 1  # (groups: the first `keep` groups keep their inputs on the device)
        tensors = {id(t): t for _, args, params, _ in group for t in (*args, *params)
                   if isinstance(t, torch.Tensor) and t.requires_grad}  # (cos / sin: once for the group)
        with self.off.saving(x) if self.off and not last and self.n > self.keep else contextlib.nullcontext():
            return _Group.apply(group, y, x, *tensors.values())

    def end(self, x):
        """The forward's blocks are done: x, their output, with its group closed (-> x)."""
        x = self.close(x, last=True)
        if self.off:
            self.off.prefetch_last()  # backward starts with the last block, which was not offloaded
        return x


def checkpoint_blocks(model, on=True, offload=False, keep=0, every=1):
    """keep: with offload, the first `keep` blocks' inputs stay on the device (the rest go to the host); every=k:
    only every k-th block's input is kept (the blocks between run again in backward)."""
    if every < 1:
        raise ValueError(f"checkpoint every {every} blocks: it must be 1 or more")
    model.block_memory = BlockCheckpoints(offload, keep, every) if on else None
    return model


def kept_on_device(layers, rows, tokens, hidden, act_bytes, host_bytes):
    """How many block inputs stay on the device so that the offloaded rest fit `host_bytes` (None: no limit)."""
    x = rows * tokens * hidden * act_bytes
    return 0 if host_bytes is None else max(0, layers - host_bytes // x)


# ---------------------------------------------------------------------------------------------
# Tiled MLP (long sequences). In a block's backward the dense MLP holds [B, T, I] tensors: gate, up, their product
# and the gradient of each (Llama-3.1-8B at 500k tokens: 14 GB apiece). Tiled, the MLP runs over tiles of t
# positions, each its own checkpoint (above): forward keeps no intermediate, and backward recomputes one tile at a
# time, so one tile's [B, t, I] tensors are alive instead of the sequence's. The price: one more MLP forward.
# t follows from a byte budget for those tensors (MLP_LIVE of them, in the activations' dtype).
MLP_LIVE = 6


def tile_mlp(model, budget_bytes):
    """Run every dense MLP in tiles whose intermediates fit `budget_bytes` (0: whole, the default)."""
    for m in model.modules():
        if hasattr(m, "tiler"):  # (mlp.MLP)
            m.tiler = functools.partial(tiled, budget=budget_bytes) if budget_bytes else None
    return model


def tile_tokens(budget_bytes, rows, width, itemsize):
    """Positions per tile: MLP_LIVE tensors of [rows, t, width] within the budget (at least one)."""
    return max(1, budget_bytes // (MLP_LIVE * rows * width * itemsize))


def tiled(module, run, x, width, budget):
    """run(x) (module's computation; its trainable parameters get the gradients) over tiles of the sequence."""
    B, T = x.shape[:2]
    t = tile_tokens(budget, B, width, x.element_size())
    if T <= t:
        return run(x)
    rng = module.training and any(isinstance(d, torch.nn.Dropout) and d.p > 0 for d in module.modules())
    params = [p for p in module.parameters() if p.requires_grad]

    def one(xt):
        if not torch.is_grad_enabled():
            return run(xt)
        if _SHARDED:
            return torch.utils.checkpoint.checkpoint(run, xt, use_reentrant=False, context_fn=recompute_context)
        return _Recompute.apply(run, (0, rng), xt, *params)
    return torch.cat([one(x[:, a: a + t]) for a in range(0, T, t)], 1)


# ---------------------------------------------------------------------------------------------
# CUDA graphs of a whole forward + backward
class Graphed:
    """A loss's forward + backward recorded as a CUDA graph, then replayed (train.py --cuda_graphs).
    A small model's step is bound by the CPU launching its ~3,000 kernels one by one (Llama-3.2-1B at
    4 x 2048: the GPU idles ~15% of the step); a replay launches them all at once. A replay reads the batch
    from fixed tensors and writes the loss and the gradients to the same memory every time, so:
    - fixed shapes: packed rows padded to max_len. One graph per batch shape (the last batch of an epoch
      may have fewer rows), at most MAX_GRAPHS, all in one memory pool (they never run at the same time);
    - the gradients stay allocated and the graph adds into them (zeroed after each step, never set to None);
    - nothing in it may make the CPU wait for the GPU (the SFT loss keeps every row: a fixed shape);
    - no dropout (its RNG state is read on the host), no varlen attention (it reads lengths back), one process.
    A shape's first batch runs eagerly (Triton compiles, cuBLAS picks its kernels, AdamW makes its state);
    its second is captured, then every batch of that shape is copied in and replayed."""
    MAX_GRAPHS = 4

    def __init__(self, loss_backward, model):
        """loss_backward(batch, scale): forward, backward of loss x scale, -> the loss (detached); model: whose
        trainable parameters' .grad the graph adds into."""
        self.loss, self.model, self.graphs, self.seen, self.pool = loss_backward, model, {}, set(), None
        self.calls, self.replays = 0, 0  # micro-batches seen; how many of them a graph ran

    def capture(self, batch):
        """-> (static batch, static scale, static loss, graph), recorded without running anything."""
        for p in self.model.parameters():  # the graph adds into these: they must exist before it
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        static = {k: v.clone() for k, v in batch.items()}
        scale = torch.ones((), device=batch["input_ids"].device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self.loss(static, scale)
        self.pool = g.pool()
        return static, scale, out, g

    def __call__(self, batch, scale):
        """Summed loss of `batch`; its gradient times `scale` is added to every .grad."""
        self.calls += 1
        key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
        if key not in self.graphs:
            if key not in self.seen or len(self.graphs) >= self.MAX_GRAPHS or not batch["input_ids"].is_cuda:
                self.seen.add(key)  # (on CPU every call runs eagerly: the tests)
                return self.loss(batch, scale)
            self.graphs[key] = self.capture(batch)
        static, static_scale, out, g = self.graphs[key]
        for k, v in batch.items():
            static[k].copy_(v, non_blocking=True)
        static_scale.fill_(scale)
        g.replay()
        self.replays += 1
        return out


# ---------------------------------------------------------------------------------------------
# Host memory on a CPU
def keep_freed_memory():
    """CPU training frees and re-allocates the same GBs of activations every step. glibc's malloc hands
    blocks over ~32 MiB back to the OS at once (mmap/munmap), so each step page-faults them in again
    (freshly zeroed pages): ~1 s of a 5.9 s default-job step on the 2-core CI machine. Keep them: larger
    blocks come from the heap (M_MMAP_THRESHOLD), and freed memory is not trimmed (M_TRIM_THRESHOLD,
    M_TOP_PAD). The process's resident memory then stays at its peak. glibc only; elsewhere a no-op."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    libc.mallopt(M_TOP_PAD, 1 << 30)


# ---------------------------------------------------------------------------------------------
# The planner (train.py --plan, and a line before every run loads): the step's peak GPU memory and the host memory
# it takes, predicted from the model's modules (built on the meta device, so the real shapes, 4-bit storage and
# adapters count) and the run's settings, N = rows x tokens. At the peak (one block's backward) these are alive:
#   weights as stored (NF4: 1/2 byte a value + 1/32 of that for the quant state), trainable state (fp32 value,
#     gradient and AdamW's two moments: 16 bytes a value; bf16 in full fine-tuning: 2 + 2 + 8)
#   block inputs kept for backward, L x [N, C] (two on the GPU with offload, the rest on the host); L / k of them
#     checkpointing every k blocks, plus the k - 1 a group's backward recomputes; without checkpointing every
#     block's working set
#   one block's working set: each projection's output and its gradient, N x sum(widths) x 2 values, the dense
#     MLP's three [N, I] (gate, up, their product) at most the tile budget when tiled; routed experts: k of them
#   a token mixer's own fp32 working set, bytes a token (GatedDeltaNet.work_bytes: the chunked delta rule's)
#   the head: the final hidden state and its gradient ([N, C] x 2) and a [1024, V] fp32 chunk of logits
#   a 4-bit weight dequantized where it is used (the largest: a MoE layer's stacked experts)
# BLOCK_FACTOR scales the working set to what the allocator held in measured peaks: with it every single-GPU peak
# in results/bench.json and #22's long-context table (Llama 8B / 1B / 135M, Qwen3-MoE, gpt-oss, Gemma 3 / 4,
# Qwen3.5; LoRA, QLoRA, full; 2k to 131k tokens) is within 4% (tests/test_plan.py).
BLOCK_FACTOR, WORKSPACE = 0.8, 80 << 20  # (WORKSPACE: cuBLAS / Triton workspaces, the allocator's rounding)
GIB = 2**30


def _block_widths(block, k):
    """(values per token of the block's projections outside the dense MLP, the dense MLP's [I] values per token,
    the token mixer's own working bytes per token)."""
    other, mlp, own = 0, 0, 0
    for m in block.modules():
        own += m.work_bytes() if hasattr(m, "work_bytes") else 0
        if hasattr(m, "tiler"):  # a dense MLP: gate, up and their product, I each
            mlp += (3 if m.gated else 2) * m.width
        elif hasattr(m, "shapes") and hasattr(m, "act"):  # stacked experts, k per token: gate_up, h, down
            other += k * (m.shapes["gate_up_proj"][1] + m.shapes["down_proj"][2] + m.shapes["down_proj"][1])
    dense = {id(p) for m in block.modules() if hasattr(m, "tiler") or hasattr(m, "shapes") for p in m.modules()}
    for m in block.modules():
        if id(m) not in dense and hasattr(m, "out_features") and not any(hasattr(c, "out_features")
                                                                          for c in m.children()):
            other += m.out_features
    return other, mlp, own


_SIZES = {}  # the last model planned, by id, its parameters' bytes and trainable count -> _sizes (a search plans it
#             many times)


def _sizes(model, act_bytes):
    """What plan needs of the model whatever the length: (weights, trainable, dequant, per-block widths)."""
    key = (id(model), act_bytes, *map(sum, zip(*((p.numel() * p.element_size(), p.numel() * p.requires_grad)
                                                 for p in model.parameters()))))  # (changed in place: planned anew)
    if key in _SIZES:
        return _SIZES[key]
    weights = trainable = 0
    seen = set()  # (tied embeddings: one tensor in two modules)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel() * p.element_size() * 4  # (value, gradient, AdamW's two moments)
            else:
                weights += p.numel() * p.element_size()
        weights += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
        weights += getattr(m, "nbytes", 0) // 32 if hasattr(m, "state") else 0  # (NF4's absmax)
    # a 4-bit or FP8 weight is dequantized where it is used: the largest (a MoE layer's stacked experts) is transient
    dequant = max((m.in_features * m.out_features * act_bytes for m in model.modules() if hasattr(m, "dense_weight")
                   and hasattr(m, "in_features")), default=0)
    widths = [_block_widths(b, model.config.num_experts_per_tok or 1) for b in model.model.layers]
    _SIZES.clear()
    _SIZES[key] = weights, trainable, dequant, widths
    weakref.finalize(model, _SIZES.pop, key, None)
    return _SIZES[key]


def plan(model, rows, tokens, act_bytes=2, checkpoint=True, offload=True, tile_bytes=0, keep=0, every=1) -> dict:
    """Predicted bytes: weights, trainable (with gradients and AdamW state), block inputs (GPU / host), the block
    working set, the head, and their sums `gpu` and `host` (see above)."""
    cfg, N = model.config, rows * tokens
    weights, trainable, dequant, widths = _sizes(model, act_bytes)
    work = max(BLOCK_FACTOR * (2 * act_bytes * N * (o + (m if not tile_bytes else 0)) + (
        min(2 * act_bytes * N * m, tile_bytes) if tile_bytes else 0)) + N * own for o, m, own in widths)
    work = int(work)
    x = N * cfg.hidden_size * act_bytes  # one block input
    L = len(widths)
    G = -(-L // every)  # checkpointed inputs kept: one a group of `every` blocks (whose backward holds every - 1 more)
    inputs_gpu = ((2 + keep) * x if offload else G * x) if checkpoint else L * work
    stores = {cfg.kv_source(i) for i in range(L)} - {None}  # (Gemma 4: layers whose keys later layers reuse keep
    inputs_gpu += len(stores) * work if checkpoint else 0  # their whole graph, model.forward)
    host = (G - keep) * x if checkpoint and offload else 0
    head = 2 * x + 1024 * cfg.vocab_size * 4
    regroup = (every - 1) * x if checkpoint else 0  # (a group's inputs, recomputed in its backward)
    gpu = WORKSPACE + weights + trainable + inputs_gpu + max(head, work + x + dequant + regroup)  # (head or a block)
    return dict(weights=weights, trainable=trainable, inputs_gpu=inputs_gpu, host=host, block=work, head=head,
                dequant=dequant, gpu=gpu)


def longest(model, rows, gpu_bytes, peak=None, **kw) -> int:
    """The longest sequence (tokens per row) whose predicted peak fits gpu_bytes (0 if none); peak(tokens) -> bytes
    (default: plan's with these keywords)."""
    peak = peak or (lambda t: plan(model, rows, t, **kw)["gpu"])
    lo, hi = 0, 1
    while peak(hi) <= gpu_bytes and hi < 2**26:
        lo, hi = hi, hi * 2
    while hi - lo > 256:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= gpu_bytes else (lo, mid)
    return lo
