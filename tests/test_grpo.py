"""grpo.py: the losses, advantages and masks against the published formulas written out independently (and TRL's
GRPO loss where TRL is installed), any micro-batch split = the whole batch's update, batched rollouts = one-row
greedy generation, rewards that raise named, and the script end to end."""
import json
import math
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import families, make_tiny_run_model, tiny_lora_model

import grpo
import runs
import train
from cli import NanotuneError
from data import IGNORE, collate
import model
from model import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(kind, **kw):
    d = dict(loss=kind, epsilon=0.2, epsilon_high=None, beta=0.0, max_new_tokens=6)
    d.update(kw)
    return SimpleNamespace(**d)


def written_out(kind, logp, old, ref, adv, mask, c):
    """The step's loss, token by token in plain Python: the formulas of the docstring, not the code's tensors."""
    eps_lo = {"gspo": 3e-4}.get(kind, 0.2) if c.epsilon is None else c.epsilon
    eps_hi = {"gspo": 4e-4, "dapo": 0.28}.get(kind, eps_lo) if c.epsilon_high is None else c.epsilon_high
    total, tokens, rows = 0.0, 0, len(adv)
    for i in range(rows):
        ts = [t for t in range(len(mask[i])) if mask[i][t]]
        seq = math.exp(sum(logp[i][t] - old[i][t] for t in ts) / max(len(ts), 1))  # GSPO's ratio
        s = 0.0
        for t in ts:
            rho = seq if kind == "gspo" else math.exp(logp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - eps_lo), 1 + eps_hi)
            lt = -min(rho * adv[i], clipped * adv[i])
            if ref is not None:
                lt += c.beta * (math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1)
            s += lt
        tokens += len(ts)
        total += s if kind == "dapo" else s / c.max_new_tokens if kind == "dr_grpo" else s / max(len(ts), 1)
    return total / (tokens if kind == "dapo" else rows)


@pytest.mark.parametrize("kind", grpo.LOSSES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_losses_equal_the_formulas_written_out(kind, beta):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 6
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[2] = 0  # a completion with no token
    c = cfg_for(kind, beta=beta, epsilon=None)  # (each loss's own defaults: GSPO 3e-4 / 4e-4, DAPO 0.2 / 0.28)
    loss, mets = grpo.policy_loss(kind, logp, old, ref if beta else None, adv, mask, c)
    count = mask.sum() if kind == "dapo" else B
    want = written_out(kind, logp.tolist(), old.tolist(), ref.tolist() if beta else None, adv.tolist(),
                       mask.tolist(), c)
    assert abs(float(loss.sum() / count) - want) < 1e-12
    assert 0 < float(mets["clip_frac"].sum()) and ("kl" in mets) == bool(beta)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo"])
def test_policy_loss_equals_trls(kind):
    """TRL's GRPOTrainer._compute_loss on the same log-probs (its model pass replaced by ours)."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer
    g = torch.Generator().manual_seed(1)
    B, T = 4, 5
    logp = -torch.rand(B, T, generator=g) * 3
    old, ref = logp + torch.randn(B, T, generator=g) * 0.3, logp + torch.randn(B, T, generator=g) * 0.5
    adv, mask = torch.randn(B, generator=g), (torch.rand(B, T, generator=g) > 0.3).float()
    mask[1] = 0  # (a completion cut at max_new_tokens under mask_truncated_completions: counted, trains nothing)
    c = cfg_for(kind, beta=0.04)
    trainer = object.__new__(GRPOTrainer)  # only the attributes _compute_loss reads
    trainer.__dict__.update(
        loss_type=kind, importance_sampling_level="token", epsilon_low=0.2,
        epsilon_high=0.28 if kind == "dapo" else 0.2, beta=0.04, max_completion_length=c.max_new_tokens,
        off_policy_mask_threshold=None, top_entropy_quantile=1.0, use_vllm=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, model=SimpleNamespace(training=True),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction: x, sync_gradients=True))
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    try:
        got = GRPOTrainer._compute_loss(trainer, None, {
            "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
            "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
            "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum()})
    except (AttributeError, KeyError, TypeError) as e:  # (TRL's internals moved: say so rather than pass)
        pytest.fail(f"TRL's _compute_loss needs more of its trainer than this test sets up: {e!r}")
    loss, _ = grpo.policy_loss(kind, logp, old, ref, adv, mask, c)
    count = mask.sum() if kind == "dapo" else B
    assert abs(float(loss.sum() / count) - float(got)) < 1e-5


@pytest.mark.parametrize("on", [False, True])
def test_mask_truncated_completions_trains_no_token_of_a_cut_completion(on, tmp_path, monkeypatch):
    """A completion that reaches max_new_tokens without a stop token is cut; with mask_truncated_completions its
    tokens leave the loss mask (the step's count then: TRL's), one that stops on the last token is not cut, and the
    share cut is logged either way."""
    make_tiny_run_model(tmp_path)
    import formats
    tok = formats.load_tokenizer(str(tmp_path))
    m = tiny_lora_model(tmp_path).train()
    cfg = train.parse_config(["--model", str(tmp_path), "--loss", "dapo", "--max_new_tokens", "4",
                              "--num_generations", "4", "--mask_truncated_completions", str(on).lower(),
                              "--output_dir", str(tmp_path / "o")], grpo.GRPOConfig)
    stop = min(tok.stop_ids)
    comps = [[7, 8, 9, 10], [7, stop], [7, 8, 9, stop], [11, 12, 13, 14]]  # cut, stopped, stopped at 4, cut
    monkeypatch.setattr(grpo, "rollout", lambda model, prompts, *a: a[-1].update(graphs=False, dense_base=False) or [
        list(c) for c in comps])  # (a: ..., info, which the run log's line reads)
    monkeypatch.setattr(grpo, "score", lambda rewards, weights, records, texts: (
        torch.zeros(4, 2), torch.tensor([1.0, 0.0, 0.5, 0.25])))
    task = grpo.GRPO(cfg, m, tok)
    b = task.sample([{"prompt_ids": tok.chat([{"role": "user", "content": "2+2?"}]), "index": 0, "record": {}}],
                    tok, 0)
    trained = (b["labels"][:, 1:] != IGNORE).sum(1).tolist()
    assert trained == ([0, 2, 4, 0] if on else [4, 2, 4, 4])
    assert task.count(b) == sum(trained) and float(b["stat:truncated"]) == 2
    loss, _ = task.loss(m, b)
    loss.backward()  # (fully masked rows in the batch: a finite loss and gradient)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    said = []  # (a step whose every completion is masked has a 0 gradient: the stall warning names it)
    stall = runs.Stall(said.append, task)
    for step in range(runs.Stall.STEPS):
        stall.update(0.0, step)
    assert ("mask_truncated_completions left it out" in said[0]) == on and "every advantage is 0" in said[0]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_the_formula(scale):
    r = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    adv, flat = grpo.advantages(r, 4, scale)
    vals = r.tolist()
    for g in range(3):
        grp = vals[4 * g: 4 * g + 4]
        std = statistics.stdev(vals) if scale == "batch" else statistics.stdev(grp)
        for j, x in enumerate(grp):
            want = x - statistics.mean(grp)
            want = want if scale == "none" else want / (std + 1e-4)
            assert abs(float(adv[4 * g + j]) - want) < 1e-12
    assert flat.tolist() == [False, True, False]  # the all-equal group (DAPO's dynamic sampling drops it)


def rollout_batch(task, tok, prompts, comps, adv, keep=None):
    b = collate([{"input_ids": p + c, "labels": [IGNORE] * len(p) + c} for p, c in zip(prompts, comps)], tok.pad_id)
    b.update(advantages=torch.tensor(adv), keep=torch.ones(len(adv)) if keep is None else torch.tensor(keep))
    return b


@pytest.mark.parametrize("kind,beta,mu", [("grpo", 0.0, 1), ("grpo", 0.04, 2), ("dr_grpo", 0.0, 1),
                                          ("dapo", 0.0, 2), ("gspo", 0.04, 1)])
def test_any_micro_batch_split_gives_the_same_update(kind, beta, mu, tmp_path):
    """The step's gradient from one micro-batch of 6 completions = from 6 of one (batched = per example) = from
    2 + 4, with masks (padding, prompts, a dropped group for DAPO), old log-probs off the current policy (mu > 1)
    and the reference (beta > 0): the normalisation is by the whole step's count."""
    make_tiny_run_model(tmp_path)
    import formats
    tok = formats.load_tokenizer(str(tmp_path))
    m = tiny_lora_model(tmp_path).train()
    cfg = train.parse_config(["--model", str(tmp_path), "--loss", kind, "--beta", str(beta), "--num_iterations",
                              str(mu), "--max_new_tokens", "6", "--output_dir", str(tmp_path / "o")], grpo.GRPOConfig)
    task = grpo.GRPO(cfg, m, tok)
    g = torch.Generator().manual_seed(0)
    prompts = [tok.chat([{"role": "user", "content": f"What is {i}?"}]) for i in range(6)]
    comps = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (3, 6, 1, 5, 6, 2)]
    adv = torch.randn(6, generator=g).tolist()
    keep = [1, 1, 0, 0, 1, 1] if kind == "dapo" else None
    whole = rollout_batch(task, tok, prompts, comps, adv, keep)
    if mu > 1:
        with torch.no_grad():  # off-policy old log-probs: the current policy's, nudged
            whole["old"] = task.logps(m, whole) + 0.1 * torch.randn(whole["labels"][:, 1:].shape, generator=g)
    if beta:
        whole["ref"] = task.reference(whole)

    def part(idx):
        b = {k: v[idx] for k, v in whole.items()}
        T = int(b["attention_mask"].sum(1).max())  # (a split's own padding)
        return {k: (v[:, :T] if k in ("input_ids", "labels", "attention_mask") else v[:, :T - 1]
                    if k in ("old", "ref") else v) for k, v in b.items()}

    grads = []
    for split in ([list(range(6))], [[i] for i in range(6)], [[0, 1], [2, 3, 4, 5]]):
        m.zero_grad()
        train.accumulate(m, [part(torch.tensor(s)) for s in split], task)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    n_tokens = ((whole["labels"][:, 1:] != IGNORE).sum(-1) * whole["keep"]).sum()
    assert task.count(whole) == (int(n_tokens) if kind == "dapo" else 6)  # DAPO: the kept completion tokens
    for other in grads[1:]:
        assert (other - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_batched_rollouts_equal_one_row_greedy_generation(tmp_path):
    """Rows of different lengths decoded together (left-padded, one KV cache) give each row's greedy tokens
    (through its stop id) as recomputing it alone, the whole sequence every step, does."""
    make_tiny_run_model(tmp_path)
    import formats
    tok = formats.load_tokenizer(str(tmp_path))
    m = tiny_lora_model(tmp_path).eval()
    prompts = [tok.chat([{"role": "user", "content": t}]) for t in ("hi", "what is the answer here?", "2+2")]
    stops = {3, 7, 11}  # (a few ids the tiny model is likely to hit: rows end at different steps)
    got = grpo.rollout(m, prompts, 12, stops, tok.pad_id, temperature=0.0)
    for p, row in zip(prompts, got):
        assert row == generate(m, p, max_new_tokens=12, stop_ids=stops, use_cache=False)
    assert len({len(r) for r in got}) > 1 or all(len(r) == 12 for r in got)


STATIC = ["llama", "gemma3", "gpt_oss", "qwen3_moe", "deepseek_v3", "llama4_text", "gemma4_text", "cohere2",
          "olmo3", "ministral3", "mistral"]


def left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long), torch.randint(3, 120, (n,), generator=g)])
                       for n in lengths])
    return ids, (ids != 0).long() * (torch.arange(L) >= L - torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("arch", STATIC)
def test_static_decode_steps_equal_eager_ones(arch, tmp_path):
    """The decode step a CUDA graph replays (the position a tensor, the cache read up to a 4-key bucket's end, the
    inputs in fixed buffers; run eagerly here) gives the eager step's logits (1e-5, fp32) at every step across
    bucket ends and past the sliding windows and chunks, rows finishing at different steps, padded prompts; and so
    does a decoder whose prompts prefilled in row chunks (2 rows, then 1)."""
    from conftest import make_hf_model
    import formats
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf")).eval()
    assert "training mode" in model.static_decoding(m.train()) and model.static_decoding(m.eval()) is None
    ids, mask = left_padded([3, 9, 6])
    N = 14
    eager, static = model.Decoding(m, 3, 9 + N, False), model.Decoding(m, 3, 9 + N, True, bucket=4)
    rows = model.Decoding(m, 3, 9 + N, False)
    with torch.no_grad():
        a, b, r = eager.prefill(ids, mask), static.prefill(ids, mask), rows.prefill(ids, mask, rows=2)
        for i in range(N - 1):
            assert (a - b).abs().max() < 1e-5 * max(1.0, float(a.abs().max())), (arch, i)
            assert (a - r).abs().max() < 1e-5 * max(1.0, float(a.abs().max())), (arch, i)
            live = torch.tensor([True, i < 5, i < 9])
            tok = a.argmax(-1)
            a, b, r = eager.step(tok, live), static.step(tok, live), rows.step(tok, live)
    assert static.cache.span == 9 + N and (static.cache.at == 9 + N - 2).all()  # (it reached the last bucket)


@pytest.mark.parametrize("arch", ["lfm2", "qwen3_5_text", "granitemoehybrid", "mpt", "phi3-longrope"])
def test_static_decode_refused_where_states_or_host_positions_need_it(arch, tmp_path):
    """Recurrent layers (their states replaced each step), ALiBi and LongRoPE (chosen on the host) decode eagerly:
    static_decoding names why, and a rollout left to choose (graphs=None) takes the eager path there."""
    from conftest import make_hf_model
    import formats
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf")).eval()
    assert model.static_decoding(m)
    prompts = [[5, 17, 33], [9, 41, 7, 8, 12]]
    assert grpo.rollout(m, prompts, 6, set(), 0, temperature=0.0) == [
        generate(m, p, max_new_tokens=6, use_cache=False) for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "gpt_oss", "gemma3"])
def test_graph_decoding_equals_eager_rollouts(arch, tmp_path):
    """On the CPU the static step run eagerly gives the eager decoder's rollouts (greedy and sampled, rows of
    different lengths, past a 256-key bucket's end). On CUDA (bf16: the experts' grouped path) each step replayed
    from its bucket's CUDA graph gives the logits of the same static step run eagerly, across a bucket end."""
    from conftest import make_hf_model
    import formats
    make_hf_model(arch, tmp_path / "hf")
    if not torch.cuda.is_available():
        m = formats.load_model(str(tmp_path / "hf")).eval()
        prompts = [[5, 17, 33, 9], [3 + i % 117 for i in range(247)], [41, 7]]  # (the longest crosses a bucket end)
        for temperature in (0.0, 1.0):
            runs = [grpo.rollout(m, prompts, 20, {3}, 0, temperature=temperature, seeds=[1, 2, 3], graphs=g)
                    for g in (False, True)]
            assert runs[0] == runs[1]
        return
    m = formats.load_model(str(tmp_path / "hf"), dtype=torch.bfloat16, device="cuda").eval()
    assert model.static_decoding(m) is None
    if m.config.num_experts:  # (fp32 experts take the reference loop, which waits on the host: not captured)
        assert "reference loop" in model.static_decoding(formats.load_model(str(tmp_path / "hf"), device="cuda"))
    ids, mask = (t.cuda() for t in left_padded([247, 4, 2]))
    graphed, eager = model.Decoding(m, 3, 280, True), model.Decoding(m, 3, 280, True)
    eager.capture = False
    with torch.no_grad():
        a, b = graphed.prefill(ids, mask), eager.prefill(ids, mask)
        for i in range(20):
            assert (a.float() - b.float()).abs().max() <= 1e-3 * b.float().abs().max(), i
            live = torch.tensor([True, i < 7, True], device="cuda")
            tok = b.argmax(-1)
            a, b = graphed.step(tok, live), eager.step(tok, live)
    assert sorted(graphed.graphs) == [256, 280] and not eager.graphs and graphed.failed is None


def test_a_capture_that_fails_leaves_the_rollout_eager_and_says_why(tmp_path, monkeypatch):
    """If CUDA refuses a bucket's capture, that step and the rest run static but eagerly (the same tokens), and the
    rollout's info and the run log's line say why; simulated here by a capture that raises."""
    from conftest import make_hf_model
    import formats
    make_hf_model("llama", tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf")).eval()
    init = model.Decoding.__init__

    def capturing(self, *a, **k):
        init(self, *a, **k)
        self.capture = self.static  # (as on CUDA)

    def refused(self, span):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    prompts = [[5, 17, 33, 9], [41, 7]]
    eager = grpo.rollout(m, prompts, 12, {3}, 0, temperature=1.0, seeds=[1, 2], graphs=False)
    monkeypatch.setattr(model.Decoding, "__init__", capturing)
    monkeypatch.setattr(model.Decoding, "captured", refused)
    info = {}
    assert grpo.rollout(m, prompts, 12, {3}, 0, temperature=1.0, seeds=[1, 2], graphs=True, info=info) == eager
    assert info == {"graphs": False, "dense_base": False,
                    "graphs_failed": "RuntimeError: CUDA error: operation not permitted when stream is capturing"}
    line = grpo.rollout_line(m, grpo.GRPOConfig(), info)
    assert line == "rollouts: decode step eager (its CUDA graph capture failed: " + info["graphs_failed"] + ")"


def test_a_4bit_base_dequantized_once_samples_the_same_rollouts(tmp_path):
    """quant.dense_base: inside, every 4-bit layer's weight is dequantized once (what each step would dequantize);
    rollouts through it (eager and static) are the per-step-dequantizing ones token for token, greedy and sampled;
    the copies are gone after. --rollout_dense_base true over a base that is not 4-bit is refused."""
    import quant
    make_tiny_run_model(tmp_path)
    m = tiny_lora_model(tmp_path, prepare=quant.prepare_4bit).eval()
    layers = [x for x in m.modules() if isinstance(x, quant.Linear4bit)]
    assert layers and quant.dense_bytes(m) == sum(x.in_features * x.out_features * 4 for x in layers)
    with quant.dense_base(m):
        assert all(torch.equal(x.dense, quant.dequantize_nf4(dict(x.state, weight=x.packed()))) for x in layers)
    assert all(x.dense is None for x in layers)
    prompts = [[5, 17, 33, 9], [41, 7], [8, 9, 10, 11, 12, 13]]
    for temperature, graphs in ((0.0, False), (1.0, True)):
        info = {}
        runs = [grpo.rollout(m, prompts, 10, {3}, 0, temperature, seeds=[1, 2, 3], graphs=graphs, dense=d, info=info)
                for d in (False, True)]
        assert runs[0] == runs[1] and info == {"graphs": graphs, "dense_base": True}
        gib = f"{quant.dense_bytes(m) / 2**30:.1f} GiB"
        line = grpo.rollout_line(m, grpo.GRPOConfig(), info)
        assert line.endswith(f"the 4-bit base dequantized once per rollout ({gib})")
        assert grpo.rollout_line(m, grpo.GRPOConfig(), dict(info, dense_base=False)).endswith(
            f"; the 4-bit base dequantized at every step (--rollout_dense_base true: once per rollout, +{gib})")
    c = grpo.GRPOConfig(rollout_dense_base=True)
    with pytest.raises(NanotuneError, match="not 4-bit"):
        grpo.check(c)
    c.load_in_4bit = True
    grpo.check(c)
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(NanotuneError, match="under torchrun"):
            grpo.check(c)
    finally:
        del os.environ["WORLD_SIZE"]


def test_row_sampling_draws_from_the_softmax_within_top_k_and_top_p():
    """Each row's own generator, the Gumbel-max trick: over 4000 draws the frequencies are the softmax's (within
    0.03); top-k and top-p keep only the tokens they should; temperature 0 is the argmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    draws = torch.cat([grpo.sample_rows(logits, 1.0, 0, 1.0, [torch.Generator().manual_seed(i)])
                       for i in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert (freq - logits.softmax(-1)[0]).abs().max() < 0.03
    gens = [torch.Generator().manual_seed(i) for i in range(300)]
    assert set(torch.cat([grpo.sample_rows(logits, 1.0, 2, 1.0, [g]) for g in gens]).tolist()) == {0, 1}
    for top_p, kept in ((0.5, {0}), (0.7, {0, 1})):  # (p = 0.563, 0.207, 0.126, ...)
        assert set(torch.cat([grpo.sample_rows(logits, 1.0, 0, top_p, [g]) for g in gens]).tolist()) == kept
    assert grpo.sample_rows(logits, 0.0, 0, 1.0, []).tolist() == [0]


def test_a_reward_that_raises_names_the_record(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def bad(record, text):\n    return 1 / 0\n")
    c = SimpleNamespace(rewards=[f"{path}:bad"], max_new_tokens=4, format_regex=".*")
    rewards = grpo.load_rewards(c)
    with pytest.raises(NanotuneError, match=r"p\.jsonl:3: reward 'bad' raised ZeroDivisionError"):
        grpo.score(rewards, [1.0], [{"_where": "p.jsonl:3"}], ["text"])
    (tmp_path / "broken.py").write_text("def f(record, text):\n    return (\n")
    with pytest.raises(NanotuneError, match=r"broken\.py raised SyntaxError while loading"):
        grpo.load_rewards(SimpleNamespace(rewards=[f"{tmp_path / 'broken.py'}:f"], max_new_tokens=4, format_regex=""))
    with pytest.raises(NanotuneError, match="neither a built-in"):
        grpo.load_rewards(SimpleNamespace(rewards=["nope"], max_new_tokens=4, format_regex=".*"))


def test_builtin_rewards():
    f = grpo.builtin_rewards(SimpleNamespace(max_new_tokens=10, format_regex=r"^\s*-?\d+\s*$"))
    rec = {"answer": "12"}
    assert f["numeric"](rec, "It is 12.") == 1.0 and f["numeric"](rec, "12 or 13") == 0.0
    assert f["format"](rec, " 12\n") == 1.0 and f["format"](rec, "12.") == 0.0
    assert f["exact"](rec, " 12 ") == 1.0 and f["length"](rec, "12345") == -0.5


@pytest.mark.slow
def test_default_job_runs_and_logs_rewards(tmp_path):
    """`python grpo.py` (the bundled task, the default model) for two steps: metrics carry the reward, each
    reward function's, KL-free clip fraction and completion length; before/after samples are printed."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "grpo.py", "--max_steps", "2", "--num_generations", "4",
                        "--micro_batch_size", "2", "--output_dir", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"step"' in x]
    assert {"reward", "rewards/numeric", "rewards/format", "clip_frac", "completion_len"} <= set(rows[-1])
    assert "before" in (r.stdout + r.stderr).lower()


def test_resume_samples_and_trains_as_the_uninterrupted_run(tmp_path):
    """A run resumed from its step-2 checkpoint samples the same rollouts (their seeds follow the step) and logs
    the uninterrupted run's steps 3 and 4: rewards, loss and gradient norm; with --log_completions (and gradient
    accumulation) its completions.jsonl, cut back to the checkpoint's step first, ends equal to the uninterrupted
    run's: every sampled completion once, under the step it was sampled for, with its rewards."""
    import shutil
    make_tiny_run_model(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n")
    common = ["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "p.jsonl"), "--max_steps", "4",
              "--save_steps", "2", "--num_generations", "4", "--max_new_tokens", "5", "--lr", "1e-2",
              "--rewards", "length", "numeric", "--reward_weights", "1", "1", "--sample_prompts_file", "",
              "--cache_dir", "", "--log_completions", "true", "--grad_accum", "2", "--micro_batch_size", "1"]
    grpo.main(common + ["--output_dir", str(tmp_path / "ref")])
    shutil.copytree(tmp_path / "ref", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "adapter")
    for c in os.listdir(tmp_path / "run" / "checkpoints"):
        if c != "step-000002":
            shutil.rmtree(tmp_path / "run" / "checkpoints" / c)
    grpo.main(common + ["--output_dir", str(tmp_path / "run"), "--resume"])

    def steps(d):
        rows = {r["step"]: r for r in map(json.loads, open(d / "metrics.jsonl")) if "step" in r and "loss" in r}
        return [{k: rows[s][k] for k in ("reward", "loss", "grad_norm", "completion_len")} for s in (3, 4)]
    assert steps(tmp_path / "run") == steps(tmp_path / "ref")
    assert steps(tmp_path / "ref")[0]["grad_norm"] > 0
    logged = [list(map(json.loads, open(d / "completions.jsonl"))) for d in (tmp_path / "ref", tmp_path / "run")]
    assert logged[0] == logged[1] and [r["step"] for r in logged[0]] == [s for s in (1, 2, 3, 4) for _ in range(8)]
    for r in logged[0]:  # (2 micro-batches x 1 prompt x 4 completions a step)
        assert r["reward"] == pytest.approx(r["rewards"]["length"] + r["rewards"]["numeric"])
        assert r["prompt"].count("+ 1?") == 1 and isinstance(r["completion"], str) and isinstance(r["truncated"], bool)
    by_step = {}
    for r in logged[0]:
        by_step.setdefault((r["step"], r["prompt"]), []).append(r)
    for grp in by_step.values():  # group advantages (scale group): mean 0 within each prompt's 4 completions
        assert len(grp) == 4 and abs(sum(r["advantage"] for r in grp)) < 1e-5


@pytest.mark.parametrize("method", [["--load_in_4bit", "true"], ["--lora", "false", "--beta", "0.04"]],
                         ids=["qlora", "full-with-reference"])
def test_qlora_and_full_fine_tuning_train(method, tmp_path):
    """QLoRA (NF4 base, adapters on it, reference = adapters off) and full fine-tuning (the reference a frozen
    copy, beta > 0): two steps run, the KL is logged, the result is written."""
    make_tiny_run_model(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n")
    out = tmp_path / "run"
    grpo.main(["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "p.jsonl"), "--max_steps", "2",
               "--num_generations", "4", "--max_new_tokens", "5", "--lr", "1e-2", "--rewards", "length", "numeric",
               "--reward_weights", "1", "1", "--sample_prompts_file", "", "--cache_dir", "", "--output_dir", str(out),
               *method])
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert len(rows) == 2 and rows[0]["grad_norm"] > 0
    assert ("kl" in rows[-1]) == ("--beta" in method)
    assert os.path.isdir(out / ("adapter" if "--lora" not in method else "model"))


# What a CUDA graph capture cannot hold: ops whose result the host must read (a sync), or a host tensor copied in.
HOST_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "bincount",
              "repeat_interleave", "equal", "is_nonzero", "allclose", "item"}


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op dispatched inside it that would wait on (or copy from) the host on CUDA."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in HOST_SYNCS or (name == "lift_fresh" and out.dim() > 0):  # (a 0-dim host tensor is a scalar)
            self.seen.append(str(func))
        return out


@pytest.mark.parametrize("arch", families(STATIC + ["qlora"]))
def test_the_static_decode_step_never_waits_on_the_host(arch, tmp_path, monkeypatch):
    """CUDA graph capture fails on any op that waits on the host (.item(), nonzero, unique, a host tensor copied
    in). The static step (model.Decoding.run) dispatches none, in bf16 with the experts on their CUDA path
    (torch's grouped_mm, which the CPU has too), and on a 4-bit base with LoRA, dequantized per step or once."""
    import formats
    import kernels
    import quant
    from conftest import make_hf_model
    grouped = kernels.moe_experts_grouped
    monkeypatch.setattr(kernels, "moe_experts", lambda *a, **k: grouped(*a, **k))  # (the CUDA choice, on the CPU)
    if arch == "qlora":
        make_tiny_run_model(tmp_path)
        m = tiny_lora_model(tmp_path, prepare=quant.prepare_4bit, dtype=torch.bfloat16)
    else:
        make_hf_model(arch, tmp_path / "hf")
        m = formats.load_model(str(tmp_path / "hf"), dtype=torch.bfloat16)
    m.eval()
    assert model.static_decoding(m) is None
    ids, mask = left_padded([3, 9, 6])
    for dense in ((False, True) if arch == "qlora" else (False,)):
        dec = model.Decoding(m, 3, 24, True, bucket=8)
        with torch.no_grad(), quant.dense_base(m, dense):
            tok = dec.prefill(ids, mask).argmax(-1)
            for i in range(4):  # (past the first bucket's end, at 9 + 4 keys)
                live = torch.tensor([True, True, i < 2])
                with HostSyncs() as probe:
                    tok = dec.step(tok, live).argmax(-1)
                assert probe.seen == [], (arch, dense, i, probe.seen)
