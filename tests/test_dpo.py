"""Preference training: losses and metrics against the published formulas written out independently,
gradients of the batched masked path against a plain per-example one, short runs that learn, bad data."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_tiny_run_model

import dpo
import lora
import formats
from cli import NanotuneError

ls = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731  log sigmoid
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def cfg(**kw):
    return dpo.DPOConfig(**kw)


def rand_logps(P, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    lc, lr = -torch.rand(P, **f64) * 40 - 1, -torch.rand(P, **f64) * 40 - 1
    rc, rr = lc + torch.randn(P, **f64), lr + torch.randn(P, **f64)
    nc, nr = torch.randint(1, 30, (P,), generator=g).double(), torch.randint(1, 30, (P,), generator=g).double()
    nll = torch.rand(P, generator=g, dtype=torch.float64) * 3
    return lc, lr, rc, rr, nc, nr, nll


def reference_pair(kind, c, lc, lr, rc, rr, nc, nr, nll):
    """One pair, plain Python floats: the formulas as TRL implements them."""
    b, e = c.beta, c.label_smoothing
    if kind == "dpo":
        h = (lc - rc) - (lr - rr)
        loss = -((1 - e) * ls(b * h) - e * ls(-b * h)) / (1 - 2 * e)
        return loss + c.rpo_alpha * nll, b * (lc - rc), b * (lr - rr), {"nll_loss": nll} if c.rpo_alpha else {}
    if kind == "ipo":  # (+ RPO's alpha * NLL of the chosen answer, TRL's rpo_alpha)
        h = (lc - rc) / nc - (lr - rr) / nr
        return (h - 1 / (2 * b)) ** 2 + c.rpo_alpha * nll, b * (lc - rc), b * (lr - rr), {}
    if kind == "orpo":
        ac, ar = lc / nc, lr / nr
        lo = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
        return nll - b * ls(lo), b * ac, b * ar, {"log_odds_ratio": ls(lo), "log_odds_chosen": lo, "nll_loss": nll}
    ac, ar = lc / nc, lr / nr  # simpo
    z = b * (ac - ar) - c.simpo_gamma
    return -(1 - e) * ls(z) - e * ls(-z) + c.cpo_alpha * nll, b * ac, b * ar, {}


@pytest.mark.parametrize("kind,kw", [("dpo", {"rpo_alpha": 0.0}), ("dpo", {"label_smoothing": 0.2, "rpo_alpha": 0.0}),
                                     ("ipo", {"beta": 0.5, "rpo_alpha": 0.0}),
                                     ("dpo", {"rpo_alpha": 1.0}), ("ipo", {"rpo_alpha": 0.5}),
                                     ("orpo", {"beta": 0.25}), ("simpo", {"beta": 2.0, "simpo_gamma": 0.8}),
                                     ("simpo", {"cpo_alpha": 1.0, "label_smoothing": 0.1})])
def test_pair_losses_and_metrics_equal_the_formulas(kind, kw):
    c = cfg(loss=kind, **kw)
    lc, lr, rc, rr, nc, nr, nll = rand_logps(16)
    loss, mets = dpo.pair_loss(kind, c, lc, lr, rc, rr, nc, nr, nll)
    for i in range(16):
        want, ch, rj, extra = reference_pair(kind, c, *(float(t[i]) for t in (lc, lr, rc, rr, nc, nr, nll)))
        assert loss[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert mets["rewards/chosen"][i].item() == pytest.approx(ch, rel=1e-9)
        assert mets["rewards/rejected"][i].item() == pytest.approx(rj, rel=1e-9)
        assert mets["rewards/margins"][i].item() == pytest.approx(ch - rj, rel=1e-9, abs=1e-12)
        assert mets["rewards/accuracies"][i].item() == float(ch > rj)
        assert mets["logps/chosen"][i].item() == float(lc[i]) and mets["logps/rejected"][i].item() == float(lr[i])
        for k, v in extra.items():
            assert mets[k][i].item() == pytest.approx(v, rel=1e-9)


def test_kto_loss_and_metrics_equal_the_formulas():
    c = cfg(loss="kto", beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    lc, lr, rc, rr, *_ = rand_logps(8, seed=1)
    label = torch.tensor([True, False, True, True, False, False, True, False])
    loss, kl, rewards = dpo.kto_loss(c, lc, rc, label, lr, rr)
    kl_ref = max(0.0, sum(float(lr[i] - rr[i]) for i in range(8)) / 8)
    assert kl.item() == pytest.approx(kl_ref, rel=1e-12)
    for i in range(8):
        r = float(lc[i] - rc[i])
        want = 1.5 * (1 - sig(0.3 * (r - kl_ref))) if label[i] else 0.7 * (1 - sig(0.3 * (kl_ref - r)))
        assert loss[i].item() == pytest.approx(want, rel=1e-9)
    mets = dpo.kto_metrics(kl, rewards, lc, label)
    d = [0.3 * float(lc[i] - rc[i]) for i in range(8) if label[i]]
    u = [0.3 * float(lc[i] - rc[i]) for i in range(8) if not label[i]]
    assert mets["rewards/chosen"].mean().item() == pytest.approx(sum(d) / len(d), rel=1e-9)
    assert mets["rewards/rejected"].mean().item() == pytest.approx(sum(u) / len(u), rel=1e-9)
    assert mets["kl"].mean().item() == pytest.approx(kl_ref, rel=1e-12)


def pairs_for_tiny(tok):
    q = ["What is 2 plus 2?", "Name a colour.", "Say hi."]
    a = ["It is 4.", "Blue.", "Hi there!"]
    b = ["No idea, go away.", "Whatever.", "..."]
    items = []
    for i, (x, y, z) in enumerate(zip(q, a, b)):
        p, c = dpo._completion(tok, [{"role": "user", "content": x}], y, "t")
        _, r = dpo._completion(tok, [{"role": "user", "content": x}], z, "t")
        items.append({"prompt": p, "chosen": c, "rejected": r, "index": i})
    return items


@pytest.mark.parametrize("kind", ["dpo", "orpo", "simpo", "ipo"])
def test_batched_masked_gradients_equal_per_example_autograd(kind, tmp_path):
    make_tiny_run_model(tmp_path)
    tok = formats.load_tokenizer(str(tmp_path))
    items = pairs_for_tiny(tok)
    c = cfg(loss=kind, beta=0.5, cpo_alpha=0.5)

    def fresh():
        m = formats.load_model(str(tmp_path))
        torch.manual_seed(0)
        lora.apply_lora(m, r=4, alpha=8)
        with torch.no_grad():
            for _, layer in lora.lora_layers(m):
                for _, b in layer.pairs():
                    b.normal_(0, 0.05)
        return m.train()

    m = fresh()
    task = dpo.Preference(c, m)
    loss, _ = task.loss(m, task.collate(items, tok))
    loss.backward()
    batched = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    m2 = fresh()  # plain: each sequence alone, no padding, full log_softmax, formulas by hand

    def seq(ids, start):
        logits = m2.logits(m2(torch.tensor([ids])))[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return lp[start - 1:].sum(), len(ids) - start, lp
    total = 0
    for x in items:
        lc, nc, lpc = seq(x["prompt"] + x["chosen"], len(x["prompt"]))
        lr, nr, _ = seq(x["prompt"] + x["rejected"], len(x["prompt"]))
        with torch.no_grad():
            lora.set_lora_enabled(m2, False)
            rc = seq(x["prompt"] + x["chosen"], len(x["prompt"]))[0]
            rr = seq(x["prompt"] + x["rejected"], len(x["prompt"]))[0]
            lora.set_lora_enabled(m2, True)
        b = c.beta
        if kind == "dpo":  # (+ RPO: the chosen answer's per-token NLL, rpo_alpha 1 by default)
            total = total - torch.nn.functional.logsigmoid(b * ((lc - rc) - (lr - rr))) + c.rpo_alpha * (-lc / nc)
        elif kind == "ipo":
            total = total + ((lc - rc) / nc - (lr - rr) / nr - 1 / (2 * b)) ** 2 + c.rpo_alpha * (-lc / nc)
        elif kind == "orpo":
            ac, ar = lc / nc, lr / nr
            lo = (ac - ar) - (torch.log(1 - torch.exp(ac)) - torch.log(1 - torch.exp(ar)))
            total = total + (-lpc.mean()) - b * torch.nn.functional.logsigmoid(lo)
        else:
            z = b * (lc / nc - lr / nr) - c.simpo_gamma
            total = total - torch.nn.functional.logsigmoid(z) + c.cpo_alpha * (-lc / nc)
    total.backward()
    for n, p in m2.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, batched[n], rtol=1e-5, atol=1e-5 * p.grad.abs().max().item()), (
                n, (p.grad - batched[n]).abs().max().item(), p.grad.abs().max().item())


def test_lora_reference_equals_a_separately_loaded_base(tmp_path):
    make_tiny_run_model(tmp_path)
    tok = formats.load_tokenizer(str(tmp_path))
    items = pairs_for_tiny(tok)
    m = formats.load_model(str(tmp_path))
    lora.apply_lora(m, r=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            for _, b in layer.pairs():
                b.normal_(0, 0.1)  # the policy now differs from the base
    task = dpo.Preference(cfg(), m)
    b = task.collate(items, tok)
    ref = task.reference(b)
    base = formats.load_model(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(ref, dpo.sequence_logps(base, b)[0], atol=1e-5)
        assert not torch.allclose(ref, dpo.sequence_logps(m, b)[0], atol=1e-3)


# the bundled demo's held-out prompts (examples/preference_prompts.txt) and the fact each answer must keep
HELD_OUT_FACTS = {"What is the capital of England?": ("london",), "How many legs does a cat have?": ("4", "four"),
                  "What is 5 plus 6?": ("11", "eleven")}


def check_facts_kept_concisely(samples):
    """The demo's promise, on the generated text: after training every held-out answer still states its
    fact, in one sentence of at most 12 words, and the answers are shorter than the model's own before."""
    s = {x["prompt"]: x for x in samples}
    sentences = lambda t: len(re.findall(r"[.!?](?:\s|$)", t.strip()))  # noqa: E731
    for q, fact in HELD_OUT_FACTS.items():
        after = s[q]["after"]
        assert any(re.search(rf"\b{f}\b", after.lower()) for f in fact), (q, s[q])  # the fact survives training
        assert sentences(after) <= 1 and len(after.split()) <= 12, (q, s[q])  # concise: no rambling
    before, after = (sum(len(s[q][k].split()) for q in HELD_OUT_FACTS) for k in ("before", "after"))
    assert after < before / 2, (before, after, samples)  # the preference shows: the model rambled before


@pytest.mark.slow
@pytest.mark.default_model
@pytest.mark.parametrize("kind,extra", [("dpo", []), ("orpo", ["--epochs", "4", "--lr", "1e-3", "--beta", "0.5"])])
def test_short_run_on_bundled_set_learns_the_preference(kind, extra, tmp_path):
    """The bundled pairs prefer the short correct answer over the same answer padded with rambling, which the
    model does not before training; the held-out questions keep their facts, now answered concisely."""
    out = tmp_path / kind
    r = subprocess.run([sys.executable, "dpo.py", "--loss", kind, "--output_dir", str(out), *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    evals = [x for x in rows if "eval_rewards/accuracies" in x]
    first, ev = evals[0], evals[-1]  # held-out pairs before (step 0) and after training
    assert first["step"] == 0 and ev["eval_rewards/accuracies"] > 0.9, ev
    assert ev["eval_rewards/margins"] > first["eval_rewards/margins"] + 0.5, (first, ev)
    if kind == "dpo":  # (ORPO's rewards are the policy's own per-token log-probs, with no reference: at step 0 the
        # short answers are already likelier per token than the padded ones, though the model's own answers ramble)
        assert first["eval_rewards/accuracies"] < 0.5, first
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    # what a user looks at: held-out questions answered right, now without the rambling
    check_facts_kept_concisely(json.load(open(out / "samples.json")))


@pytest.mark.parametrize("rec,expect", [
    ({"prompt": "q", "chosen": "a"}, "has no 'rejected'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "are identical"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}, "different prompts"),
])
def test_bad_preference_records_are_named(rec, expect, tmp_path, smollm_tok):
    tok = smollm_tok
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "chosen": "yes", "rejected": "no"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(NanotuneError, match=f"p.jsonl:2: .*{expect}"):
        dpo.preference_pairs(str(f), tok)


def test_kto_label_must_be_boolean(tmp_path, smollm_tok):
    tok = smollm_tok
    f = tmp_path / "k.jsonl"
    f.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n")
    with pytest.raises(NanotuneError, match="k.jsonl:1: KTO 'label' must be true or false"):
        dpo.preference_pairs(str(f), tok, kto=True)


@pytest.mark.parametrize("kind,extra", [("kto", []), ("simpo", []), ("ipo", []), ("dpo", ["--load_in_4bit", "true"]),
                                        ("dpo", ["--lora", "false", "--precompute_ref", "true"])])
@pytest.mark.slow
def test_every_loss_runs_end_to_end_on_a_tiny_model(kind, extra, tmp_path):
    make_tiny_run_model(tmp_path / "m")
    data = "examples/kto.jsonl" if kind == "kto" else "examples/preferences.jsonl"
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "dpo.py", "--model", str(tmp_path / "m"), "--loss", kind, "--datasets", data,
                        "--max_steps", "3", "--output_dir", str(out), "--cache_dir", "", *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) for x in rows if "loss" in x)
    assert (out / ("model" if "--lora" in extra else "adapter")).is_dir()


def test_cuda_graphs_are_refused_for_preference_training():
    import train
    cfg = train.parse_config(["--cuda_graphs", "--packing", "true"], dpo.DPOConfig)
    with pytest.raises(NanotuneError, match=r"cuda_graphs is a train.py \(SFT\) option"):
        train.check_cuda_graphs(cfg, torch.device("cuda"))


@pytest.mark.parametrize("extra", [[], ["--precompute_ref", "true"], ["--lora", "false", "--precompute_ref", "true"]],
                         ids=["lora", "lora-precomputed", "full-precomputed"])
@pytest.mark.slow
def test_step_0_eval_metrics_are_zero(extra, tmp_path):
    """Before training the policy is the reference: every held-out margin and reward is 0, with the reference
    computed live or precomputed (the eval pairs once read the training pairs' cached values: accuracy 0.625)."""
    make_tiny_run_model(tmp_path / "m")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "dpo.py", "--model", str(tmp_path / "m"), "--datasets",
                        "examples/preferences.jsonl", "--max_steps", "1", "--output_dir", str(out), "--cache_dir", "",
                        *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    first = next(json.loads(x) for x in open(out / "metrics.jsonl") if "eval_rewards/margins" in x)
    assert first["step"] == 0 and first["eval_rewards/margins"] == 0 and first["eval_rewards/accuracies"] == 0, first
    assert first["eval_rewards/chosen"] == 0 and first["eval_rewards/rejected"] == 0
