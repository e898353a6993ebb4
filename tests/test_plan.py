"""The memory planner (memory.plan, train.py --plan): its predicted peaks against the peaks bench.py measured on
the GPU (results/bench.json), and what a run does with the plan."""
import functools
import json
import os

import pytest
import torch
from conftest import ROOT, make_tiny_run_model

import bench
import bench_long
import lora
import memory
import train
from cli import NanotuneError

# #22's long-context table (8B QLoRA r16, batch 1, H200; measured before results/bench.json kept such rows)
LONG = [("8b", "qlora", 1, 32768, 12.86), ("8b", "qlora", 1, 65536, 19.65), ("8b", "qlora", 1, 131072, 32.92)]


@functools.lru_cache(maxsize=None)
def bench_model(shape, mode):
    """bench.py's model of `shape` on the meta device, as its nanotune contender trains it (LoRA r16 on every
    projection, NF4 base for qlora); built once per module (the planner only reads it)."""
    return bench_long.meta_model(bench.shape_config(shape), mode)


def measured():
    """The latest single-GPU nanotune peak of each (shape, mode, batch, seq) bench.py measured."""
    with open(os.path.join(ROOT, "results", "bench.json")) as f:
        rows = json.load(f)["rows"]
    last = {}
    for r in rows:
        if r.get("contender") == "nanotune" and r.get("shape") in bench.SHAPES and \
                r.get("mode") in ("lora", "qlora", "full") and r.get("peak_gib"):
            last[r["shape"], r["mode"], r["batch"], r["seq"]] = r["peak_gib"]
    return [(*k, v) for k, v in last.items()] + LONG


def test_the_planner_predicts_the_measured_peaks_within_ten_percent():
    """memory.plan at bench.py's settings (bf16, checkpointed blocks with offload, no tiles) against every peak
    measured on one GPU: Llama 8B / 1B / 135M, Qwen3-MoE, gpt-oss, Gemma 3, Gemma 4 and Qwen3.5 shapes (Gated
    DeltaNet's own working set); LoRA, QLoRA, full; 2k to 131k tokens; within 10% (at the calibration: 4%)."""
    cases = measured()
    assert len(cases) >= 16 and {c[0] for c in cases} >= {"8b", "qwen3moe", "gptoss", "gemma4-e4b", "qwen35-4b"}
    for shape, mode, rows, seq, gib in cases:
        got = memory.plan(bench_model(shape, mode), rows, seq)["gpu"] / memory.GIB
        assert abs(got / gib - 1) <= 0.10, (shape, mode, rows, seq, gib, got)


def cpu_bytes_per_token(mixer, hidden=256):
    """What one more token adds to the most bytes alive at once over a bf16 forward + backward of `mixer` (frozen
    weights, input gradient wanted) on the CPU: torch's memory profiler at 256 and 128 tokens, the difference / 128
    (the weights and other fixed costs cancel)."""
    from torch.profiler import ProfilerActivity, profile
    mixer = mixer.bfloat16().requires_grad_(False)

    def peak(T):
        h = torch.randn(1, T, hidden, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            mixer(h).float().sum().backward()
        alive = most = 0
        for _, action, _, size in prof._memory_profile().timeline:  # (as export_memory_timeline sums it)
            alive += size if action.name in ("CREATE", "PREEXISTING") else -size if action.name == "DESTROY" else 0
            most = max(most, alive)
        return most
    return (peak(256) - peak(128)) / 128


@pytest.mark.slow
@pytest.mark.parametrize("P,N", [(64, 128), (32, 64)])
def test_the_token_mixers_working_sets_are_what_the_reference_path_holds(P, N):
    """memory.plan's term for a mixer's own fp32 working set (work_bytes) against what torch's profiler measures on
    the CPU's reference path: Mamba2's is that (within 10%); Gated DeltaNet's, set from Qwen3.5's GPU peaks (the
    Triton scan keeps less), is at most it and not far under."""
    import mixers
    torch.manual_seed(0)
    m = mixers.Mamba2(256, 16, P, 1, N, 4, True, False, 1e-6)
    got, want = m.work_bytes(), cpu_bytes_per_token(m)
    assert abs(got / want - 1) <= 0.10, (got, want)
    d = mixers.GatedDeltaNet(256, 8, 16, P, P, 4, 1e-6)
    got, ceiling = d.work_bytes(), cpu_bytes_per_token(d)
    assert 0.7 * ceiling <= got <= ceiling, (got, ceiling)


def test_tiles_lower_the_plan_and_the_longest_sequence_grows():
    """The tiled MLP's share is capped by its budget, so the 8B QLoRA's longest sequence at 80 GiB grows (the
    block inputs then sit on the host: 8 KiB a token per layer)."""
    m = bench_model("8b", "qlora")
    whole, tiled = memory.longest(m, 1, 80 * memory.GIB), memory.longest(m, 1, 80 * memory.GIB, tile_bytes=1 << 30)
    assert 300_000 < whole < 400_000 and tiled > 2 * whole
    p = memory.plan(m, 1, 500_000, tile_bytes=1 << 30)
    assert p["gpu"] < 80 * memory.GIB and p["host"] == 32 * 500_000 * 4096 * 2


def test_a_host_memory_budget_keeps_the_first_block_inputs_on_the_gpu():
    """host_memory_gib: the offloaded block inputs fit it, the rest stay on the GPU (8B QLoRA at 500k tokens with
    1 GiB MLP tiles: 32 inputs of 3.8 GiB; 100 GiB of host holds 26 of them)."""
    m = bench_model("8b", "qlora")
    keep = memory.kept_on_device(32, 1, 500_000, 4096, 2, 100 * memory.GIB)
    p = memory.plan(m, 1, 500_000, tile_bytes=1 << 30, keep=keep)
    x = 500_000 * 4096 * 2
    assert keep == 6 and p["host"] == 26 * x <= 100 * memory.GIB and p["inputs_gpu"] == 8 * x
    assert memory.kept_on_device(32, 1, 500_000, 4096, 2, None) == 0


def test_the_planner_chooses_tiles_and_a_host_budget_when_a_run_would_not_fit(tmp_path, monkeypatch, capsys):
    """With mlp_tile_mib and host_memory_gib left unset, a run whose whole MLP would not fit the GPU gets MLP tiles,
    and one whose offloaded block inputs would not fit 80% of the host keeps its first block inputs on the GPU;
    the plan line says what was chosen (tiny model, 4M tokens a row, a GPU between the two predictions)."""
    import build
    import formats
    make_tiny_run_model(tmp_path / "m")
    m = formats.meta_model(str(tmp_path / "m")).to(torch.bfloat16)
    lora.apply_lora(m, r=16, alpha=32)
    T = 1 << 22
    whole, tiled = (memory.plan(m, 1, T, tile_bytes=t)["gpu"] / memory.GIB for t in (0, 1 << 30))
    assert tiled < whole
    monkeypatch.setattr(build, "host_bytes", lambda: memory.GIB)  # (80% of it: less than the 1 GiB offloaded)
    with pytest.raises(SystemExit):
        train.main(["--model", str(tmp_path / "m"), "--output_dir", str(tmp_path / "o"), "--plan", "--max_len",
                    str(T), "--micro_batch_size", "1", "--gpu_memory_gib", str((whole + tiled) / 2)])
    err = capsys.readouterr().err
    assert "chosen: MLP tiles of 1024 MiB (the whole MLP would not fit)" in err
    assert "the first 1 block inputs on the GPU (the host holds 0.8 GiB)" in err and "MLP tiles 1024 MiB)" in err


def test_checkpoints_every_k_blocks_when_the_inputs_fit_neither_gpu_nor_host():
    """8B QLoRA, one row of 700k tokens, an 80 GiB GPU and 128 GiB of host: with MLP tiles and the host full
    (80%), the 14 block inputs left on the GPU would not fit; checkpointing every 2 blocks keeps 16 inputs, all on
    the host, and the plan fits (the group's backward holds one more input). 500k tokens fit with every block's
    input kept. train.py --plan says so."""
    import build
    m, G = bench_model("8b", "qlora"), memory.GIB
    cfg = train.TrainConfig(max_len=700_000, micro_batch_size=1)
    p, kw, chosen = build.choose(cfg, m, torch.bfloat16, 80 * G, 128 * G)
    assert cfg.checkpoint_every == kw["every"] == 2 and kw["keep"] == 0 and cfg.mlp_tile_mib == 1024
    assert p["gpu"] <= 80 * G and p["host"] == 16 * 700_000 * 4096 * 2 <= build.HOST_SHARE * 128 * G
    assert chosen[-1] == "checkpoints every 2 blocks (the block inputs would fit neither GPU nor host)"
    one = memory.plan(m, 1, 700_000, **dict(kw, every=1, keep=memory.kept_on_device(32, 1, 700_000, 4096, 2, int(
        build.HOST_SHARE * 128 * G))))
    assert one["gpu"] > 80 * G and p["gpu"] - p["inputs_gpu"] - one["gpu"] + one["inputs_gpu"] == 700_000 * 8192
    cfg = train.TrainConfig(max_len=500_000, micro_batch_size=1)
    assert build.choose(cfg, m, torch.bfloat16, 80 * G, 128 * G)[1]["every"] == 1 == cfg.checkpoint_every


def test_the_longest_row_counts_the_planners_choices_at_that_length():
    """The plan line's longest row: 8B QLoRA on an 80 GiB GPU and 128 GiB of host reaches ~795k tokens with the
    choices left open (MLP tiles, the host budget, checkpoints every 2 blocks from ~531k on), ~531k with
    checkpoint_every 1, and what the untiled plan allows with no tiles either."""
    import build
    m, G = bench_model("8b", "qlora"), memory.GIB
    cfg = train.TrainConfig(max_len=4096, micro_batch_size=1)
    n = {}
    for name, asked in (("open", {}), ("every 1", dict(checkpoint_every=1)),
                        ("every 1, untiled", dict(checkpoint_every=1, mlp_tile_mib=0.0))):
        asked = dict(dict.fromkeys(build.CHOICES), **asked)
        n[name] = build.longest_chosen(cfg, asked, m, torch.bfloat16, 80 * G, 128 * G)
    assert 780_000 < n["open"] < 800_000 and 520_000 < n["every 1"] < 540_000
    assert n["every 1, untiled"] == memory.longest(m, 1, 80 * G)
    assert cfg.max_len == 4096 and cfg.checkpoint_every is None  # (the run's own settings are left alone)


def test_plan_prints_and_writes_nothing_and_a_run_that_cannot_fit_stops_before_loading(tmp_path, capsys):
    make_tiny_run_model(tmp_path / "m")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tmp_path / "m"), "--output_dir", str(out), "--plan", "--gpu_memory_gib", "1"])
    assert e.value.code == 0 and not out.exists()
    err = capsys.readouterr().err
    assert "plan: peak GPU memory" in err and "tokens a row fit 1 GiB (with the planner's choices there)" in err
    assert "checkpointing True every 1 blocks" in err
    with pytest.raises(NanotuneError, match=r"the planner predicts a peak of .* more than the GPU's 0 GiB; up to 0 "
                                            "tokens a row fit"):
        train.main(["--model", str(tmp_path / "m"), "--output_dir", str(out), "--gpu_memory_gib", "0.0001"])


def test_bench_max_context_search_finds_the_longest_length_that_trains():
    """bench.py --max_context's search: doubling from the start, then halving the gap to its resolution; the
    result is a length that trained (with its row), never one that failed; a step that ran out of time stops the
    search and marks the result a lower bound."""
    tried = []

    def trains(n):
        tried.append(n)
        return {"tokens": n} if n <= 345_000 else None
    seq, res = bench_long.longest_context(trains, 32768)
    assert 345_000 - 8192 <= seq <= 345_000 and res == {"tokens": seq} and len(tried) < 12
    assert bench_long.longest_context(lambda n: None, 4096) == (0, None)
    slow = lambda n: {"tokens": n} if n <= 100_000 else bench_long.TIMED_OUT  # noqa: E731  (a step over the time
    assert bench_long.longest_context(slow, 32768) == (65536, {"tokens": 65536, "timed_out_at": 131072})  # limit:
    #                                                                                          not "too big")
    tried.clear()  # from a plan (nanotune-long): the plan if it trains, else down by 1/16 until a length does
    assert bench_long.longest_context(trains, 300_032, planned=True) == (300_032, {"tokens": 300_032}) and \
        tried == [300_032]
    tried.clear()
    seq, res = bench_long.longest_context(trains, 393_216, planned=True)
    assert tried == [393_216, 368_640, 345_600, 323_840] and seq == 323_840 and res == {"tokens": seq}


def test_bench_starts_nanotune_long_at_the_planners_longest_row():
    """--max_context's start for nanotune-long: the planner's longest row under the cap with its MLP tiles and host
    budget (8B QLoRA: ~108k tokens in 16 GiB, ~203k in 24, ~393k in 40, ~796k in 80 with checkpoints every 2
    blocks); at that length the settings it runs with fit the cap, and 1/16 more would not."""
    m, G = bench_model("8b", "qlora"), memory.GIB
    got = {cap: bench_long.planned_longest(m, cap) for cap in (16, 24, 40, 80)}
    assert 100_000 < got[16] < 115_000 and 190_000 < got[24] < 215_000 and 370_000 < got[40] < 410_000
    assert 750_000 < got[80] < 850_000 and all(n % 256 == 0 for n in got.values())
    for cap, n in got.items():
        keep, every = bench_long.long_settings(m, n, cap)
        kw = dict(tile_bytes=bench_long.LONG_TILE, keep=keep, every=every)
        assert memory.plan(m, 1, n, **kw)["gpu"] <= cap * G < memory.plan(m, 1, n * 17 // 16, **kw)["gpu"]



def test_checkpoint_every_is_refused_where_it_cannot_hold(tmp_path, monkeypatch):
    """checkpoint_every below 1, or above 1 under torchrun (FSDP checkpoints block by block), is one sentence."""
    import build
    import dist
    make_tiny_run_model(tmp_path / "m")
    with pytest.raises(NanotuneError, match="--checkpoint_every 0 is out of range; use a whole number >= 1"):
        train.main(["--model", str(tmp_path / "m"), "--output_dir", str(tmp_path / "o"), "--checkpoint_every", "0"])
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    with pytest.raises(NanotuneError, match="checkpoint_every 2 is not supported under torchrun/FSDP"):
        build.build_model(train.TrainConfig(model=str(tmp_path / "m"), checkpoint_every=2), torch.device("cpu"),
                          torch.float32)


def test_bench_long_contender_chooses_as_the_planner_does():
    """bench.py's nanotune-long under an 80 GiB cap, 100 GiB of host: every block input kept at 131k (all on the
    host), the first 6 on the GPU at 500k, checkpoints every 2 blocks at 600k (all 16 inputs on the host)."""
    m = bench_model("8b", "qlora")
    assert [bench_long.long_settings(m, T, 80) for T in (131072, 500_000, 600_000)] == [(0, 1), (6, 1), (0, 2)]


def test_a_contender_past_its_time_says_where_it_stood(capsys):
    """bench.run_worker: a worker still running at --worker_timeout is stopped, counted as timed out, and its last
    lines on stderr (load time, steps done) are printed, so a peer that never finishes shows whether it was loading,
    compiling or stepping (s29-4: Unsloth on Qwen3.5 said only "skipped")."""
    import sys
    import types
    script = ("import sys, time; print('loaded in 41 s', file=sys.stderr, flush=True); "
              "print('step 1 of 4: 9.5 s', file=sys.stderr, flush=True); time.sleep(30)")
    got = bench.run_worker([sys.executable, "-c", script, "--seq", "64"], 128,
                           types.SimpleNamespace(worker_timeout=1.5), "peer")
    assert got == bench_long.TIMED_OUT
    assert "peer at 128 tokens: skipped (over 1.5 s; it printed: loaded in 41 s | step 1 of 4: 9.5 s)" in \
        capsys.readouterr().out
