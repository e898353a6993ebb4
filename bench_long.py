"""bench.py's long-context parts (split from bench.py): the `nanotune-long` contender's settings from train.py's
planner, and `--max_context`'s search for the longest sequence that trains under a memory cap.

nanotune-long starts at the planner's longest row under the cap and steps down by 1/16 until a step trains (one
measured step where the plan holds); a peer has no plan, so its length doubles from --seq until a step fails and the
gap is then halved to 8k tokens. Either way the length reported is one that trained."""
import torch

TIMED_OUT = "timed out"  # (bench.run_worker: the step did not finish within --worker_timeout)
LONG_TILE, LONG_HOST = 1 << 30, 100 << 30  # nanotune-long: MLP tiles within 1 GiB, offloaded block inputs in 100 GiB


def meta_model(cfg, mode):
    """bench.py's model of config `cfg` on the meta device, as its nanotune contender trains it (LoRA r16 on every
    projection, NF4 base for qlora): what the planner reads, no memory allocated."""
    import lora
    import quant
    from model import Transformer
    with torch.device("meta"):
        m = Transformer(cfg).to(torch.bfloat16)
    if mode == "qlora":
        quant.prepare_4bit(m)
    if mode != "full":
        lora.apply_lora(m, r=16, alpha=16)
    return m


def long_config(seq):
    import train
    return train.TrainConfig(max_len=seq, micro_batch_size=1, mlp_tile_mib=LONG_TILE / 2**20,
                             host_memory_gib=LONG_HOST / 2**30)


def long_settings(m, seq, cap_gib):
    """nanotune-long: what train.py's planner (build.choose) chooses for one row of `seq` tokens with MLP tiles of
    LONG_TILE and LONG_HOST of host memory, under the cap (0: the GPU's memory) -> (inputs kept on the GPU, k of
    checkpoints every k blocks)."""
    import build
    cap = cap_gib * 2**30 or torch.cuda.get_device_properties(0).total_memory
    kw = build.choose(long_config(seq), m, torch.bfloat16, cap, None)[1]
    return kw["keep"], kw["every"]


def planned_longest(m, cap_gib):
    """nanotune-long's longest row (tokens, a multiple of 256) under a cap of cap_gib by the planner, with the
    choices long_settings makes at that length."""
    import build  # (long_config fixes the tiles and the host budget; checkpoint_every stays the planner's choice)
    return build.longest_chosen(long_config(4096), {}, m, torch.bfloat16, cap_gib * 2**30, None) // 256 * 256


def longest_context(trains, start, resolution=8192, planned=False):
    """(the longest n with trains(n) a result, that result), (0, None) if none. From a plan: `start`, then down by
    1/16 until one trains. Otherwise doubling from `start` until one fails, then halving the gap to `resolution`.
    A step out of time stops it: the result is marked a lower bound."""
    ok, bad, res, n = 0, None, None, start
    while n:
        r = trains(n)
        if r is TIMED_OUT:
            return ok, res and dict(res, timed_out_at=n)
        ok, res, bad = (n, r, bad) if r else (ok, res, n)
        if planned:  # the first length that trains, stepping down from the plan
            n = 0 if r else n * 15 // 16 // 256 * 256
        elif bad is None:  # doubling
            n = 2 * n if n < 2**23 else 0
        else:  # halving the gap between the longest that trained and the shortest that failed
            n = (ok + bad) // 2 // 256 * 256 if bad - ok > resolution else 0
    return ok, res
