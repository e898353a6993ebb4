"""nanotune dist: torchrun process groups, FSDP2 sharding, distributed checkpoints. PyTorch's own engine only.

    torchrun --standalone --nproc_per_node=8 train.py --config run.yaml            # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST0:29500 --rdzv_id=run1 train.py --config run.yaml  # on each of two nodes

Every decoder block is its own FSDP2 unit (`fully_shard`), the root holds embeddings, final norm and
lm_head. Mixed precision: parameters all-gathered in bf16 on GPU, gradients reduce-scattered in fp32.
The loss runs through `model.run(fn, ...)`, registered as an FSDP forward method, so the root's
lm_head is gathered while the fused loss uses it. Checkpoints are torch.distributed.checkpoint
(sharded, any world size can resume them). train.py builds the model on the meta device, applies LoRA and
`shard` there, and each rank then loads only its rows of every tensor. Without torchrun every helper is a no-op.
"""
import datetime
import pickle
import os
import signal
import sys

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init(device_pref: str = "auto", timeout_s: float = 600.0):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) when launched by torchrun; returns the
    device this rank computes on. A collective that waits longer than timeout_s for the other ranks fails
    (one of them hung or died), and the worker ends with its torchrun agent."""
    cuda = torch.cuda.is_available() and device_pref != "cpu"
    if "RANK" not in os.environ or is_dist():
        return None
    end_with_parent()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return torch.device(f"cuda:{local}" if cuda else "cpu")


def end_with_parent():
    """Linux: SIGTERM this process when its parent (the torchrun agent) dies, even by SIGKILL, which gives
    the agent no chance to stop its workers."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def is_timeout(e: BaseException) -> bool:
    """A collective gave up waiting for the other ranks (gloo and NCCL word it differently)."""
    return is_dist() and any(w in str(e).lower() for w in ("timed out", "timeout"))


def shutdown():
    if is_dist():
        dist.destroy_process_group()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum a detached tensor over ranks, in place (every rank calls it at the same point)."""
    if is_dist():
        dist.all_reduce(t)
    return t


def all_sums(xs: list) -> list:
    """Sum a list of Python numbers over ranks, in one collective."""
    if not is_dist():
        return list(xs)
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    return all_sum_tensor(t).tolist()


def barrier():
    if is_dist():
        dist.barrier()


def shard(model, device, dtype):
    """FSDP2 over each block and the root. Parameters are gathered in the training dtype `dtype` (LoRA's
    fp32 weights too, as the fused LoRA path casts them anyway; a 4-bit weight stores its packed bytes
    as `dtype`, so the cast leaves them untouched) and gradients are reduced in fp32. FSDP averages
    gradients over ranks; train.accumulate scales each rank's loss by the world size, so the result is
    the gradient of the global token-normalised loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (world(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "run")
    return model


def full_tensor(t):
    """A sharded DTensor gathered to an ordinary tensor (a collective: every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model) -> dict:
    """model.state_dict() with every sharded tensor gathered (a collective under FSDP)."""
    return {k: full_tensor(v) for k, v in model.state_dict().items()}


def assign_param(param: torch.nn.Parameter, full: torch.Tensor) -> torch.nn.Parameter:
    """Put a whole tensor into a parameter's place: a sharded one (FSDP2 shards dim 0 as torch.chunk does)
    keeps only this rank's rows in its local storage; otherwise a new Parameter holding `full`, frozen or
    not as `param` was."""
    if hasattr(param, "to_local"):
        local, mesh = param.to_local(), param.device_mesh
        chunks = full.chunk(mesh.size(), 0)  # fewer chunks than ranks when rows < ranks: the rest hold none
        with torch.no_grad():
            local.copy_(chunks[mesh.get_local_rank()] if mesh.get_local_rank() < len(chunks) else full[:0])
        return param
    return torch.nn.Parameter(full, requires_grad=param.requires_grad)


# ---------------------------------------------------------------------------------------------
# Distributed checkpoints (torch.distributed.checkpoint): trainable weights + optimizer, by FQN
def save_sharded(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    dcp.save({"model": {k: v for k, v in msd.items() if k in trainable}, "optim": osd}, checkpoint_id=path)


# DCP reads `.metadata` with pickle.load, so a crafted file would run code at --resume. Before DCP opens it, it is
# unpickled here with only the classes DCP's own metadata is made of (torch 2.6-2.13); anything else is refused.
DCP_GLOBALS = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch", "Size"), ("collections", "OrderedDict"),
               ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if not (module == "torch.distributed.checkpoint.metadata" or (module, name) in DCP_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which DCP's metadata never holds")
        return super().find_class(module, name)


def check_sharded(path):
    """Raise ValueError (why, in a few words) unless path/.metadata holds only DCP metadata."""
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            _MetadataUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from None


def load_sharded(path, model, opt):
    import torch.distributed.checkpoint as dcp
    check_sharded(path)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {"model": {k: v for k, v in msd.items() if k in trainable}, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))


def rank_slice(idx, r, w):
    """This rank's part of a global micro-batch (contiguous, so the split is the same at any world size)."""
    n = -(-len(idx) // w)
    return idx[r * n : (r + 1) * n]
