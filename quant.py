"""nanotune 4-bit: NF4 quantization byte-identical to bitsandbytes, with double quantization, a 4-bit
linear layer for QLoRA, quantize-while-loading, and bitsandbytes' checkpoint layout in and out.

NF4 (QLoRA, arXiv:2305.14314): weights flattened row-major, cut into blocks of 64; per block
    absmax_b = max |w|  (fp32),   code_i = nearest NF4 value to w_i / absmax_b   (4 bits, ties -> lower)
    packed byte k = code[2k] << 4 | code[2k+1]          (first element in the high nibble)
Double quantization: absmax - mean(absmax) quantized again with the signed 8-bit dynamic map (through
bitsandbytes' 65,536-point lookup grid, see dynamic_lut), in blocks of 256 (nested_absmax = per-256 max),
so the constants cost ~0.127 instead of 0.5 bits/weight.

    import quant
    model = formats.load_model(path, dtype=torch.bfloat16, device="cuda", prepare=quant.prepare_4bit)  # per tensor
    quant.quantize_model(model)                # or quantize a model already in memory
    formats.save_4bit(model, "out/model-bnb-4bit")   # loads in transformers + bitsandbytes
"""
import contextlib
import functools
import json

import torch
import torch.nn as nn

import dist
import kernels
from cli import NanotuneError
from kernels import E4M3
from mlp import Experts

# The 16 NF4 values (bitsandbytes' table, index = 4-bit code)
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0], dtype=torch.float32)
BLOCK, NESTED_BLOCK = 64, 256
CHUNK = BLOCK * 2**18  # quantize_nf4 works through 16M elements at a time (its fp32 and int64 temporaries: of a
#                        slice, not of a whole stack of experts, which peaked at 6 GB over a 1 GB gpt-oss stack)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: for exponent i = 0..6 the midpoints of
    linspace(0.1, 1, 2^i + 1) scaled by 10^(i-6), both signs; plus 0 and 1; sorted (256 values)."""
    vals = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        vals += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(vals + [0.0, 1.0]), dtype=torch.float32)


DYNAMIC = dynamic_map()


def dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU kernel does not search the 256 dynamic-map codes: it rounds the scaled value to
    the nearest of 65,536 grid points over [-1, 1] (g_j = j / 32767.5 - 1) and takes the code nearest
    that grid point (measured against bitsandbytes 0.50.2: every boundary sits on a grid midpoint, and 0.0
    itself maps to the code 2.1e-5). This is that table: grid index -> code index (ties -> lower)."""
    grid = (torch.arange(65536, dtype=torch.float64) / 32767.5 - 1).float().double()
    code = DYNAMIC.double()
    return torch.bucketize(grid, (code[:-1] + code[1:]) / 2).to(torch.uint8)


DYNAMIC_LUT = dynamic_lut()


def blockwise_absmax_codes(x: torch.Tensor, code: torch.Tensor, block: int, lut=None):
    """Flat fp32 x -> (uint8 code index per element, fp32 absmax per block).
    Scaled values are x * (1 / absmax) for full blocks and x / absmax for the short last one, then
    clamped to [-1, 1]; the code is the nearest `code` value (bucketize against midpoints, a tie goes to
    the lower index), or, given `lut`, the table entry of the nearest grid point (see dynamic_lut)."""
    n = x.numel()
    full = n - n % block
    absmax = x[:full].view(-1, block).abs().amax(1)
    scaled = (x[:full].view(-1, block) * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        tail = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail[None]])
        scaled = torch.cat([scaled, x[full:] / tail])
    scaled = scaled.clamp(-1, 1)
    if lut is not None:  # fp32 throughout, as the C++ kernel: j = floor((s + 1) * 32767.5 + 0.5)
        j = torch.floor((scaled + 1) * 32767.5 + 0.5).long().clamp(0, 65535)
        return lut.to(x.device)[j], absmax
    mids = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, mids.to(x.device)).to(torch.uint8), absmax


def quantize_nf4(w: torch.Tensor, double_quant=True) -> dict:
    """Any-shape float tensor -> the quant state (bitsandbytes' field names)."""
    x = w.detach().reshape(-1)
    parts = [blockwise_absmax_codes(x[i:i + CHUNK].float(), NF4, BLOCK) for i in range(0, max(x.numel(), 1), CHUNK)]
    codes, absmax = (torch.cat(t) if len(t) > 1 else t[0] for t in zip(*parts))
    if codes.numel() % 2:  # an odd count is padded with the code of 0.0 (index 7), as bitsandbytes does
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    state = {"weight": ((codes[0::2] << 4) | codes[1::2])[:, None], "absmax": absmax, "shape": list(w.shape),
             "dtype": w.dtype}
    if double_quant:
        offset = absmax.mean()
        q, nested = blockwise_absmax_codes(absmax - offset, DYNAMIC, NESTED_BLOCK, lut=_table(DYNAMIC_LUT, w.device))
        state.update(absmax=q, nested_absmax=nested, offset=float(offset))
    return state


def dequantize_nf4(state: dict, dtype=None) -> torch.Tensor:
    dev = state["weight"].device
    nested = "nested_absmax" in state
    return kernels.nf4_dequantize(state["weight"], state["absmax"], _table(NF4, dev), state["shape"],
                                  dtype or state["dtype"], _table(DYNAMIC, dev) if nested else None,
                                  state.get("nested_absmax"), state.get("offset", 0.0))


# MXFP4 (OCP microscaling; gpt-oss ships its experts so): blocks of 32 FP4 (e2m1) values sharing one power-of-two
# scale. On disk: `<w>_blocks` uint8 [..., G, 16] (two values a byte, the low nibble first) and `<w>_scales` uint8
# [..., G] (the exponent + 127); value = E2M1[nibble] * 2^(scale - 127); the result is [..., G * 32].
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[..., G, 16] uint8 blocks + [..., G] uint8 exponents -> [..., G * 32] (exact in fp32 and bf16)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair")
    lut = E2M1.to(blocks.device)
    b = blocks.long()
    v = torch.stack([lut[b & 0xF], lut[b >> 4]], -1).flatten(-2)  # [..., G, 32], low nibble first
    v = torch.ldexp(v, (scales.long() - 127)[..., None].float())
    return v.flatten(-2).to(dtype)


def dequantize_mxfp4_pairs(tensors):
    """gpt-oss's MXFP4 experts: each `<w>_blocks` / `<w>_scales` pair -> `<w>` dequantized, in the checkpoint's
    16-bit layout ([E, in, out]; the pair holds [E, out, in])."""
    pending = {}
    for name, t in tensors:
        base, _, part = name.rpartition("_")
        if part not in ("blocks", "scales") or not base.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            yield name, t
            continue
        pending.setdefault(base, {})[part] = t
        if len(pending[base]) == 2:
            p = pending.pop(base)
            yield base, dequantize_mxfp4(p["blocks"], p["scales"]).transpose(1, 2)


# GGUF's 32-weight blocks (the default model's GGUF is Q4_1 with a Q8_0 embedding): an fp16 scale d (Q4_1: and
# an fp16 minimum m) before the codes. Q8_0: w = d q (int8). Q4_0: w = d (q - 8); Q4_1: w = d q + m, q 4-bit,
# weight j < 16 in byte j's low nibble, weight j + 16 in its high one. Other types go through gguf's numpy code.
GGUF_BLOCKS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def dequantize_gguf(data, kind: str, shape) -> torch.Tensor:
    """A GGUF tensor's bytes [rows, row bytes] of type `kind` (a name in GGUF_BLOCKS) -> fp32 weights [shape]."""
    b = torch.from_numpy(data.copy()).reshape(-1, GGUF_BLOCKS[kind])  # [blocks, bytes] (a memmap: read-only)
    d = b[:, :2].contiguous().view(torch.float16).float()  # [blocks, 1]
    if kind == "Q8_0":
        w = d * b[:, 2:].contiguous().view(torch.int8).float()
    else:
        q = b[:, 4 if kind == "Q4_1" else 2:]
        q = torch.cat([q & 15, q >> 4], 1).float()  # [blocks, 32]
        w = d * q + b[:, 2:4].contiguous().view(torch.float16).float() if kind == "Q4_1" else d * (q - 8)
    return w.reshape(shape)


def dequantize_fp8_blocks(tensors, block=(128, 128)):
    """FP8 checkpoints (Qwen3 / DeepSeek-V3 FP8 releases, quant_method "fp8"): each e4m3 `<w>.weight` with its
    `<w>.weight_scale_inv` [ceil(O / b0), ceil(C / b1)] -> `<w>.weight` in fp32, W = q * scale of its block, one
    tensor at a time (Linear8 rounds it to row scales as it loads; nothing holds a 16-bit model)."""
    pending = {}
    for name, t in tensors:
        base = name[: -len(".weight_scale_inv")] if name.endswith(".weight_scale_inv") else \
            name[: -len(".weight")] if name.endswith(".weight") and t.dtype == E4M3 else None
        if base is None:
            yield name, t
            continue
        pending.setdefault(base, {})["scale" if name.endswith("_inv") else "q"] = t
        if len(pending[base]) == 2:
            p = pending.pop(base)
            O, C = p["q"].shape
            s = p["scale"].float().repeat_interleave(block[0], 0)[:O].repeat_interleave(block[1], 1)[:, :C]
            yield base + ".weight", p["q"].float() * s
    if pending:
        raise NanotuneError(f"the FP8 checkpoint lacks the scales (or weights) of {next(iter(pending))!r}; it is "
                            "incomplete.")


_TABLES = {}


def _table(t, device):
    """The code tables, cached per device (no host-to-device copy per matmul)."""
    key = (id(t), str(device))
    if key not in _TABLES:
        _TABLES[key] = t.to(device)
    return _TABLES[key]


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly; backward dequantizes again (dx = dy W) and saves
    no 16-bit copy of W. The base is frozen: no gradient for W."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dense_weight(x.dtype).t()

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.layer.dense_weight(dy.dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer holding NF4 weights. `weight` is a frozen Parameter holding the packed bytes:
    bitsandbytes' uint8 [(n+1)//2, 1], or under FSDP the same bytes viewed as the dtype FSDP gathers in
    (`storage`, zero-padded to whole elements), so fully_shard shards and all-gathers them like any weight
    and its mixed-precision cast is a no-op. absmax and the rest of the quant state are 1/32 of that and
    stay whole on every rank."""

    def __init__(self, in_features, out_features, bias=None, compute_dtype=torch.bfloat16, double_quant=True,
                 storage=torch.uint8, device="meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.double_quant = compute_dtype, double_quant
        self.bias = bias  # an nn.Parameter or None
        self.nbytes = (in_features * out_features + 1) // 2
        self.weight = nn.Parameter(torch.empty(-(-self.nbytes // storage.itemsize), 1, dtype=storage, device=device),
                                   requires_grad=False)
        self.state = None  # absmax, [nested_absmax, offset], shape, dtype
        self.parts = {}  # a pre-quantized bitsandbytes weight's tensors, collected while loading
        self.dense = None  # the weight dequantized once, inside dense_base()

    @classmethod
    def from_linear(cls, lin: nn.Linear, double_quant=True):
        q = cls(lin.in_features, lin.out_features, lin.bias, lin.weight.dtype, double_quant, device=lin.weight.device)
        q.set_dense(lin.weight)
        return q

    def set_dense(self, w):
        self.compute_dtype = w.dtype
        self.set_state(quantize_nf4(w, self.double_quant))

    def set_state(self, state):
        """Take a quant state (quantize_nf4's dict); its packed bytes go into `weight`, padded and viewed
        as `storage`; a sharded (FSDP) weight keeps only this rank's rows."""
        flat = state.pop("weight").reshape(-1)
        storage = self.weight.dtype
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % storage.itemsize)])
        self.weight = dist.assign_param(self.weight, flat.view(storage).view(-1, 1))
        self.state = state

    def packed(self) -> torch.Tensor:
        """bitsandbytes' uint8 [(n+1)//2, 1] (a view of `weight`; whole inside an FSDP forward/backward)."""
        return self.weight.view(torch.uint8).reshape(-1)[: self.nbytes].view(-1, 1)

    def dense_weight(self, dtype=None) -> torch.Tensor:
        if self.dense is not None and (dtype or self.compute_dtype) == self.dense.dtype:
            return self.dense
        return dequantize_nf4(dict(self.state, weight=self.packed()), dtype or self.compute_dtype)

    def forward(self, x):
        y = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        return y + self.bias if self.bias is not None else y

    def _apply(self, fn, recurse=True):
        """.to(device) moves the bytes and the quant state; a dtype cast (model.to(bf16)) leaves them be."""
        raw = self.weight.detach()
        super()._apply(fn, recurse)
        if self.weight.dtype != raw.dtype:
            self.weight = nn.Parameter(raw.to(self.weight.device), requires_grad=False)
        if self.state is not None:
            for k in ("absmax", "nested_absmax"):
                if k in self.state:
                    t = fn(self.state[k])
                    self.state[k] = t if t.dtype == self.state[k].dtype else self.state[k].to(t.device)
        return self

    # bitsandbytes' state-dict layout -------------------------------------------------------
    def _save_to_state_dict(self, dest, prefix, keep_vars):
        super()._save_to_state_dict(dest, prefix, keep_vars)
        if hasattr(self.weight, "to_local"):  # sharded under FSDP: the frozen shard only (never checkpointed)
            return
        s = self.state
        dest[prefix + "weight"] = self.packed()
        dest[prefix + "weight.absmax"] = s["absmax"]
        dest[prefix + "weight.quant_map"] = NF4.clone()
        meta = {"quant_type": "nf4", "blocksize": BLOCK, "dtype": str(s["dtype"]).removeprefix("torch."),
                "shape": s["shape"]}
        if "nested_absmax" in s:
            dest[prefix + "weight.nested_absmax"] = s["nested_absmax"]
            dest[prefix + "weight.nested_quant_map"] = DYNAMIC.clone()
            meta.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32", nested_offset=s["offset"])
        dest[prefix + "weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()),
                                                                             dtype=torch.uint8)

    def assign_tensor(self, key: str, t: torch.Tensor, device, dtype):
        """Loading hook (model.load_tensors): a dense `weight` is quantized on `device` right away; the
        parts of a pre-quantized bitsandbytes weight are collected until complete."""
        if key == "bias":
            self.bias = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        elif key == "weight" and t.is_floating_point():
            self.compute_dtype = dtype
            self.set_state(quantize_nf4(t.to(device=device, dtype=dtype), self.double_quant))
        else:
            self.parts[key] = t.to(device)
            if "weight" in self.parts and "weight.quant_state.bitsandbytes__nf4" in self.parts:
                self._from_bnb(self.parts, dtype)

    def _from_bnb(self, parts, dtype):
        meta = json.loads(bytes(parts["weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
        if meta.get("quant_type") != "nf4" or meta.get("blocksize") != BLOCK:
            raise NanotuneError(f"4-bit checkpoint uses {meta.get('quant_type')} with blocksize "
                                f"{meta.get('blocksize')}; "
                                "nanotune reads nf4 with blocksize 64.")
        if "nested_blocksize" in meta and meta["nested_blocksize"] != NESTED_BLOCK:
            raise NanotuneError("4-bit checkpoint uses a nested blocksize other than 256.")
        if "weight.absmax" not in parts or ("nested_blocksize" in meta and "weight.nested_absmax" not in parts):
            return  # wait for the rest
        state = {"weight": parts["weight"].view(torch.uint8).reshape(-1, 1), "absmax": parts["weight.absmax"],
                 "shape": meta["shape"], "dtype": getattr(torch, meta["dtype"])}
        if "nested_blocksize" in meta:
            state.update(nested_absmax=parts["weight.nested_absmax"].float(), offset=meta["nested_offset"])
        self.set_state(state)
        self.compute_dtype = dtype
        self.parts = {}

    @property
    def is_ready(self):
        return self.state is not None


class QuantExperts(Experts):
    """A MoE block's experts (the bulk of its bytes) frozen in NF4 (QLoRA) or, with fp8, in e4m3 with a scale per
    row (--base_dtype float8): each stacked weight [E, out, in] is held as a Linear4bit / Linear8 over its
    [E * out, in] rows (NF4 flattens row-major, so the bytes are those of the stacked tensor, and sharding,
    loading and moving work as for any such linear; a row is one expert's output). Each call dequantizes the
    whole stack into the compute dtype (transient: one layer's experts), then runs the same grouped path."""

    def __init__(self, shapes: dict, act, double_quant=True, storage=torch.uint8, device="meta", biases=False,
                 fp8=False):
        nn.Module.__init__(self)
        self.shapes, self.act = shapes, act
        for p, (E, out, inp) in shapes.items():
            setattr(self, p, Linear8(inp, E * out, device=device) if fp8 else
                    Linear4bit(inp, E * out, double_quant=double_quant, storage=storage, device=device))
            if biases:  # gpt-oss: the biases stay in the compute dtype
                setattr(self, f"{p}_bias", nn.Parameter(torch.zeros(E, out, device=device)))

    @classmethod
    def from_experts(cls, e: Experts, double_quant=True):
        q = cls(e.shapes, e.act, double_quant, device=e.gate_up_proj.device, biases=hasattr(e, "gate_up_proj_bias"))
        for p, shape in e.shapes.items():
            getattr(q, p).set_dense(getattr(e, p).reshape(-1, shape[2]))
            if hasattr(e, f"{p}_bias"):
                setattr(q, f"{p}_bias", getattr(e, f"{p}_bias"))
        return q

    def dense(self, p, dtype=None):
        return getattr(self, p).dense_weight(dtype).view(self.shapes[p])

    def stack(self, p, dtype):  # dequantized inside the op where it is used, and freed there
        make = functools.partial(self.dense, p, dtype)
        make.shape = self.shapes[p]
        return make

    def assign_tensor(self, key: str, t: torch.Tensor, device, dtype):
        """Loading hook: a stacked `gate_up_proj` / `down_proj` is quantized as it arrives (a bias is kept)."""
        if key.endswith("_bias"):
            p = getattr(self, key)
            self._parameters[key] = dist.assign_param(p, t.to(dtype=dtype) if hasattr(p, "to_local")
                                                      else t.to(device=device, dtype=dtype))
            return
        getattr(self, key).assign_tensor("weight", t.reshape(-1, t.shape[-1]), device, dtype)

    @property
    def is_ready(self):
        return all(getattr(self, p).is_ready and not getattr(getattr(self, f"{p}_bias", None), "is_meta", False)
                   for p in self.shapes)


DEFAULT_SKIP = ("lm_head", "embed_tokens")


def _targets(model, skip):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and not any(n == s or n.endswith("." + s) for s in skip)]


def replace_module(root: nn.Module, name: str, new: nn.Module):
    """Module surgery (4-bit layers here, LoRA wrappers in lora.py): `new` takes the place of root's `name`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if type(m) is Experts]


def quantize_model(model, skip=DEFAULT_SKIP, double_quant=True):
    """Replace every nn.Linear (but `skip`) by a Linear4bit and every MoE block's experts by QuantExperts;
    lm_head and embeddings stay 16-bit."""
    for n, lin in _targets(model, skip):
        replace_module(model, n, Linear4bit.from_linear(lin, double_quant))
    for n, e in _experts(model):
        replace_module(model, n, QuantExperts.from_experts(e, double_quant))
    return model


def prepare_4bit(model, skip=DEFAULT_SKIP, double_quant=True, storage=torch.uint8):
    """For load_model(prepare=...): swap the (meta) linears for empty Linear4bit layers, so each weight
    is quantized as it is read and no full 16-bit model ever exists on host or GPU. Under FSDP `storage`
    is the dtype FSDP gathers in (dist.shard), so the packed bytes shard like any weight."""
    for n, lin in _targets(model, skip):
        replace_module(model, n, Linear4bit(lin.in_features, lin.out_features, lin.bias, double_quant=double_quant,
                                            storage=storage, device=lin.weight.device))
    for n, e in _experts(model):
        replace_module(model, n, QuantExperts(e.shapes, e.act, double_quant, storage, e.gate_up_proj.device,
                                              biases=hasattr(e, "gate_up_proj_bias")))
    return model


def dense_bytes(model) -> int:
    """What dense_base(model) holds: every 4-bit linear layer's weight (expert stacks too) in its compute dtype."""
    return sum(m.in_features * m.out_features * m.compute_dtype.itemsize for m in model.modules()
               if isinstance(m, Linear4bit))


@contextlib.contextmanager
def dense_base(model, on=True):
    """Inside: each 4-bit linear layer's weight dequantized once and reused (a rollout's decode steps then read
    16-bit weights, instead of dequantizing every weight at every step), a MoE's expert stacks included (they
    are Linear4bits too, and dense_bytes counts them); freed on exit."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)] if on else []
    try:
        for m in layers:
            m.dense = m.dense_weight()
        yield
    finally:
        for m in layers:
            m.dense = None


def bnb_quantization_config(model):
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": any("nested_absmax" in m.state for m in layers),
            "bnb_4bit_compute_dtype": str(layers[0].compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": list(DEFAULT_SKIP)}


# ---------------------------------------------------------------------------------------------
# FP8 base weights (train.py --base_dtype float8): e4m3 with a scale per output row (kernels.Float8Weight),
# rounded as each weight loads; both GEMMs run in FP8 (kernels.fp8_matmul). Half a bf16 weight's bytes. Frozen:
# LoRA trains beside it, and export.py re-reads the checkpoint's own weights (never this rounding of them).
class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return kernels.base_matmul(x.reshape(-1, x.shape[-1]), layer.float8()).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        return kernels.base_matmul(dy.reshape(-1, dy.shape[-1]), ctx.layer.float8(), False).view(
            *dy.shape[:-1], -1), None


class Linear8(nn.Module):
    def __init__(self, in_features, out_features, bias=None, compute_dtype=torch.bfloat16, device="meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.bias = compute_dtype, bias
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=kernels.E4M3, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device), persistent=False)

    @property
    def is_ready(self):
        return not self.weight.is_meta

    def float8(self) -> kernels.Float8Weight:
        return kernels.Float8Weight(self.weight, self.weight_scale)

    def dense_weight(self, dtype=None) -> torch.Tensor:
        return self.float8().dense(dtype or self.compute_dtype)

    def set_dense(self, w):
        q, s = kernels.fp8_rows(w.reshape(self.out_features, self.in_features))
        self.weight, self.weight_scale = nn.Parameter(q, requires_grad=False), s

    def assign_tensor(self, key: str, t: torch.Tensor, device, dtype):
        """Loading hook (formats.load_tensors): the weight is rounded to e4m3 on `device` as it arrives."""
        if key == "bias":
            self.bias = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        else:
            self.compute_dtype = dtype
            self.set_dense(t.to(device=device, dtype=torch.float32))

    def forward(self, x):
        y = _FP8Matmul.apply(x.to(self.compute_dtype), self)
        return y + self.bias if self.bias is not None else y

    def _apply(self, fn, recurse=True):
        """.to(device) moves the e4m3 bytes and the scales; a dtype cast (model.to(bf16)) leaves them be."""
        raw, scale = self.weight.detach(), self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != raw.dtype:
            self.weight = nn.Parameter(raw.to(self.weight.device), requires_grad=False)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self


def prepare_fp8(model, skip=DEFAULT_SKIP):
    """For load_model(prepare=...): the (meta) linears become empty Linear8 layers and each MoE block's experts
    FP8 QuantExperts, filled as weights load (embeddings and the head stay in the compute dtype)."""
    for n, lin in _targets(model, skip):
        replace_module(model, n, Linear8(lin.in_features, lin.out_features, lin.bias, device=lin.weight.device))
    for n, e in _experts(model):
        replace_module(model, n, QuantExperts(e.shapes, e.act, device=e.gate_up_proj.device,
                                              biases=hasattr(e, "gate_up_proj_bias"), fp8=True))
    return model
