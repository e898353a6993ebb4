"""Tier 3: training behaviour on a tiny model: accumulation splits, packing, resume after SIGKILL,
bad input; and the default job end to end."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, make_tiny_run_model, read_losses, tiny_lora_model

import data
import formats
from cli import NanotuneError
import memory
import quant
import train


def tiny_samples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, 100, (6 + 3 * i,), generator=g).tolist()
        labels = [data.IGNORE] * 3 + ids[3:]  # prompt-like prefix untrained
        out.append({"input_ids": ids, "labels": labels})
    return out


def lora_model(path, **load_kw):
    return tiny_lora_model(path, seed=1, **load_kw).train()


@pytest.mark.parametrize("full", [False, True])
def test_accumulation_splits_give_same_loss_and_gradients(tmp_path, full):
    make_tiny_run_model(tmp_path)
    samples = tiny_samples(4)
    results = []
    for mb, acc in [(4, 1), (1, 4), (2, 2)]:
        m = formats.load_model(str(tmp_path)).train() if full else lora_model(tmp_path)
        micro = [data.collate(samples[i * mb : (i + 1) * mb], 0) for i in range(acc)]
        loss, _, _, _ = train.accumulate(m, micro, train.SFT())
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        results.append((loss, grads))
    (l0, g0) = results[0]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(l0, rel=1e-6)
        for n, g in grads.items():
            assert torch.allclose(g, g0[n], rtol=1e-6, atol=1e-6 * g0[n].abs().max().item()), n


def test_packed_step_loss_equals_padded(tmp_path):
    make_tiny_run_model(tmp_path)
    m = lora_model(tmp_path)
    samples = tiny_samples(4)
    rows, _ = data.pack(samples, 64)
    assert len(rows) == 1
    with torch.no_grad():
        packed = train.token_loss_sum(m, data.collate(rows, 0))
        padded = train.token_loss_sum(m, data.collate(samples, 0))
    assert packed.item() == pytest.approx(padded.item(), rel=1e-6)


@pytest.mark.parametrize("mode,dtype", [("lora", torch.float32), ("lora", torch.bfloat16), ("qlora", torch.bfloat16),
                                        ("full", torch.float32)])
def test_cuda_graph_steps_follow_eager_steps(tmp_path, mode, dtype):
    """--cuda_graphs trains as the eager loop does. Its loss keeps every row (untrained ones add zero), its
    rows are padded to max_len, its gradients are zeroed and never freed. On a GPU its replays are checked
    too: six steps over two batch shapes (a graph for each, in one memory pool) give the eager losses
    and adapters (checkpointing and offload on). On CPU both loops run eagerly."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    make_tiny_run_model(tmp_path)
    rows, _ = data.pack(tiny_samples(8), 24)  # rows 0-5 hold 15-24 tokens
    # shapes [2, 24], [2, 24], [1, 24], [2, 24], [1, 24], [2, 24]: a shape's first batch runs eagerly,
    # its second is captured; the graphs share one pool, so each must leave the other's results alone
    picks = ((0, 2), (2, 2), (4, 1), (4, 2), (1, 1), (0, 2))
    batches = [data.collate(rows[i : i + n], 0, pad_to=24) for i, n in picks]
    runs = []
    for graphed in (False, True):
        kw = dict(dtype=dtype, device=dev, prepare=quant.prepare_4bit if mode == "qlora" else None)
        m = formats.load_model(str(tmp_path), **kw).train() if mode == "full" else lora_model(tmp_path, **kw)
        memory.checkpoint_blocks(m, offload=True)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2 if mode != "full" else 1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        graph = train.graphed_loss(m) if graphed else None
        out = [train.train_step(m, opt, sched, [train.to_device(b, dev)], train.SFT(graph=graph), 1.0)[:2]
               for b in batches]
        runs.append((out, {n: p.detach().float().cpu() for n, p in m.named_parameters() if p.requires_grad}))
    assert graph.calls == 6 and (graph.replays, len(graph.graphs)) == ((4, 2) if dev == "cuda" else (0, 0))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for (l_e, n_e), (l_g, n_g) in zip(runs[0][0], runs[1][0]):
        assert l_g == pytest.approx(l_e, rel=tol) and n_g == pytest.approx(n_e, rel=tol * 10)
    for n, p in runs[0][1].items():
        assert torch.allclose(runs[1][1][n], p, rtol=tol, atol=tol * p.abs().max().item()), n


def thirty_steps(tmp_path, *variants):
    """train.py on a tiny model and chat data, 30 LoRA steps (lr 1e-2, seed 3, fp32 on a GPU too) per variant (extra
    flags) -> each run's loss curve."""
    make_tiny_run_model(tmp_path / "m")
    write_chat_data(tmp_path / "d.jsonl")
    curves = []
    for i, extra in enumerate(variants):
        out = tmp_path / f"out{i}"
        train.main(["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--max_steps", "30",
                    "--lr", "1e-2", "--output_dir", str(out), "--cache_dir", "", "--sample_prompts_file", "none",
                    "--seed", "3", "--dtype", "float32", *extra])
        curves.append([json.loads(ln)["loss"] for ln in open(out / "metrics.jsonl")])
    return curves


@pytest.mark.slow
def test_thirty_steps_with_the_mlp_tiled_follow_thirty_untiled(tmp_path):
    """train.py --mlp_tile_mib (here ~7 positions per tile of a 4-row micro-batch, so each sample's MLP runs in
    several tiles, each recomputed alone in backward, inside checkpointed blocks), and the same with
    --checkpoint_every 2 (one input kept for both blocks): the 30-step loss curves equal the untiled one (fp32: the
    gradients sum in another order, so 1e-4 after 30 AdamW steps)."""
    tile = str(6 * 4 * 112 * 4 * 7 / 2**20)
    curves = thirty_steps(tmp_path, *[["--gradient_checkpointing", "true", *extra] for extra in (
        ["--mlp_tile_mib", "0"], ["--mlp_tile_mib", tile], ["--mlp_tile_mib", tile, "--checkpoint_every", "2"])])
    assert len(curves[0]) == 30 and curves[0][-1] < 0.8 * curves[0][0]  # (it trains)
    assert curves[1] == pytest.approx(curves[0], rel=1e-4) and curves[2] == pytest.approx(curves[0], rel=1e-4)


@pytest.mark.slow
def test_thirty_steps_over_an_fp8_base_follow_the_dense_base(tmp_path):
    """train.py --base_dtype float8: 30 LoRA steps over e4m3 base weights (FP8 GEMMs) follow the dense base's
    curve (the loss falls as much; each step within 3%, the last within 1%); without LoRA, or with 4-bit, it is
    refused in one sentence."""
    curves = thirty_steps(tmp_path, ["--base_dtype", "auto"], ["--base_dtype", "float8"])
    assert curves[0][-1] < 0.8 * curves[0][0] and curves[1] == pytest.approx(curves[0], rel=3e-2)
    assert curves[1][-1] == pytest.approx(curves[0][-1], rel=1e-2)
    for extra, why in ((["--lora", "false"], "needs lora true"), (["--load_in_4bit", "true"], "replaces load_in_4bit")):
        with pytest.raises(NanotuneError, match=f"base_dtype float8: it {why}"):
            train.main(["--model", str(tmp_path / "m"), "--output_dir", str(tmp_path / "x"), "--base_dtype", "float8",
                        *extra])


def test_whole_rows_build_no_attention_mask(tmp_path, monkeypatch):
    """Rows of one length (a long sequence at batch 1, say) carry no attention_mask, so the forward builds no
    [B, 1, T, T] mask (causal SDPA; at 500k tokens such a mask alone would be 250 GB); a padded batch keeps its
    mask, and both losses equal the rows' losses alone."""
    import model
    make_tiny_run_model(tmp_path)
    m = formats.load_model(str(tmp_path)).train()
    rows = [{"input_ids": list(range(3, 40)), "labels": list(range(3, 40))}, {"input_ids": list(range(5, 20)),
                                                                               "labels": list(range(5, 20))}]
    alone = [float(train.token_loss_sum(m, data.collate([r], 0))) for r in rows]
    padded = data.collate(rows, 0)
    assert "attention_mask" not in data.collate(rows[:1], 0) and "attention_mask" in padded
    assert float(train.token_loss_sum(m, padded)) == pytest.approx(sum(alone), rel=1e-5)

    def no_mask(*a, **k):
        raise AssertionError("a [B, 1, T, T] mask was built for whole rows")
    monkeypatch.setattr(model, "attention_mask_for", no_mask)
    assert float(train.token_loss_sum(m, data.collate(rows[:1], 0))) == alone[0]


def write_chat_data(path, n=12):
    with open(path, "w") as f:
        for i in range(n):
            q, a = f"What is {i} plus {i}?", f"It is {2 * i}."
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def run_train(args, driver=None, timeout=600, cwd=None):
    """train.py (or a driver script around it) in a subprocess, from `cwd` (default: a fresh directory, so no test
    reads or writes the repository's own out/, where the README's default job writes)."""
    import tempfile
    cmd = [sys.executable, "-c", driver, *args] if driver else [sys.executable, os.path.join(ROOT, "train.py"), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or tempfile.mkdtemp(), env=env)


KILL_DRIVER = """
import os, signal, sys
sys.argv = ["train.py"] + sys.argv[1:]
import train
orig, calls = train.train_step, [0]
def dying_step(*a, **k):  # the 6th step dies half-way (after its backward), 2 steps past the last checkpoint
    calls[0] += 1
    out = orig(*a, **k)
    if calls[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
train.train_step = dying_step
train.main(sys.argv[1:])
"""


def interrupted_run_setup(tmp_path):
    """A tiny model, data, the flags of a 9-step LoRA run with dropout and a checkpoint at step 4, and the
    uninterrupted run of them in tmp_path/ref."""
    make_tiny_run_model(tmp_path / "m")
    write_chat_data(tmp_path / "d.jsonl")
    common = ["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--max_steps", "9",
              "--micro_batch_size", "2", "--save_steps", "4", "--lora_dropout", "0.1", "--lr", "1e-2",
              "--sample_prompts_file", "", "--cache_dir", ""]
    ref = run_train(common + ["--output_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    return common


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_same_losses(tmp_path):
    common = interrupted_run_setup(tmp_path)
    killed = run_train(common + ["--output_dir", str(tmp_path / "run")], driver=KILL_DRIVER)
    assert killed.returncode == -9
    assert not os.path.exists(tmp_path / "run" / "adapter")  # nothing that looks finished
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-000004"]
    resumed = run_train(common + ["--output_dir", str(tmp_path / "run"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert read_losses(tmp_path / "run") == read_losses(tmp_path / "ref")  # bit-exact, fp32 CPU
    assert len(read_losses(tmp_path / "ref")) == 9


TERM_DRIVER = KILL_DRIVER.replace("signal.SIGKILL", "signal.SIGTERM").replace("calls[0] == 6", "calls[0] == 5")


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(tmp_path):
    """SIGTERM (what a scheduler sends before it kills a job) mid-step: the step finishes, a checkpoint of it is
    written, one sentence says how to resume, exit 1; --resume then gives the uninterrupted run's losses."""
    common = interrupted_run_setup(tmp_path)
    termed = run_train(common + ["--output_dir", str(tmp_path / "run")], driver=TERM_DRIVER)
    assert termed.returncode == 1, termed.stderr[-2000:]
    assert "stopped by SIGTERM after step 5" in termed.stderr and "--resume" in termed.stderr
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-000004", "step-000005"]
    assert not os.path.exists(tmp_path / "run" / "adapter")
    resumed = run_train(common + ["--output_dir", str(tmp_path / "run"), "--resume"])
    assert resumed.returncode == 0 and "step-000005" in resumed.stderr, resumed.stderr[-2000:]
    assert read_losses(tmp_path / "run") == read_losses(tmp_path / "ref")


@pytest.mark.slow
def test_resume_passes_over_damaged_files(tmp_path):
    """What a full disk or a kill leaves: a half-written metrics line is dropped; a latest checkpoint whose weights
    are cut short (or whose meta.json / config.yaml is garbage) is named and the one before it resumed, to the
    uninterrupted run's losses; with every checkpoint damaged the run stops in one sentence."""
    make_tiny_run_model(tmp_path / "m")
    write_chat_data(tmp_path / "d.jsonl")
    common = ["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--max_steps", "8",
              "--micro_batch_size", "2", "--save_steps", "3", "--lr", "1e-2", "--sample_prompts_file", "",
              "--cache_dir", "", "--output_dir", str(tmp_path / "run")]
    r = run_train(common)
    assert r.returncode == 0, r.stderr[-2000:]
    want, ck = read_losses(tmp_path / "run"), tmp_path / "run" / "checkpoints"
    for damage in ("weights", "meta", "config"):
        subprocess.run(["rm", "-rf", str(tmp_path / "run" / "adapter")])
        with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
            f.write('{"step": 7, "lo')  # a line cut short
        latest = ck / "step-000006"
        if damage == "weights":
            data = (latest / "trainable.safetensors").read_bytes()
            (latest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
        else:
            (latest / ("meta.json" if damage == "meta" else "config.yaml")).write_text("{not: [valid")
        r = run_train(common + ["--resume"])
        assert r.returncode == 0, (damage, r.stderr[-2000:])
        assert f"{latest} is damaged" in r.stderr and "resumed from" in r.stderr and "step-000003" in r.stderr
        assert read_losses(tmp_path / "run") == want, damage
        subprocess.run(["rm", "-rf", str(latest)])
        subprocess.run(["cp", "-r", str(ck / "step-000003"), str(latest)])  # (step 6 again, for the next case:
        (latest / "meta.json").write_text('{"step": 3, "world": 1}')       # a copy of step 3)
    for d in ck.iterdir():
        (d / "state.pt").write_bytes(b"PK")
    r = run_train(common + ["--resume"])
    assert r.returncode == 1 and "every checkpoint in" in r.stderr and "is damaged" in r.stderr


@pytest.mark.parametrize("args,expect", [
    (["--lerning_rate", "1"], "unknown flag --lerning_rate"),
    (["--lr", "fast"], "lr must be float"),
    (["--output_dir", "/no/such/parent/run"], "its parent '/no/such/parent' does not exist"),
    (["--datasets", "missing.jsonl"], "dataset 'missing.jsonl' does not exist"),
    (["--cuda_graphs", "--lora_dropout", "0.1"], "cuda_graphs needs " + ("" if torch.cuda.is_available() else
                                                  "a CUDA device, ") + "packing true, lora_dropout 0; change"),
])
@pytest.mark.slow
def test_bad_cli_input_is_one_line(args, expect, tmp_path):
    """Each bad flag gets its own sentence, also run from a directory whose out/ holds an earlier run (as the
    repository's does after the README's default job)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    out = [] if "--output_dir" in args else ["--output_dir", str(tmp_path / "new")]
    r = run_train(args + out + ["--sample_prompts_file", ""], timeout=120, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and expect in err[-1] and "Traceback" not in r.stderr, r.stderr


def test_unknown_yaml_key_names_the_closest(tmp_path):
    (tmp_path / "run.yaml").write_text("lora_rank: 8\n")
    with pytest.raises(NanotuneError, match="unknown key 'lora_rank' \\(did you mean 'lora_r'\\?\\)"):
        train.parse_config(["--config", str(tmp_path / "run.yaml")], train.TrainConfig)
    (tmp_path / "ok.yaml").write_text("lora_r: 8\nlr: 3e-4\ndatasets: [a.jsonl]\n")
    cfg = train.parse_config(["--config", str(tmp_path / "ok.yaml"), "--lr", "1e-4"], train.TrainConfig)
    assert (cfg.lora_r, cfg.lr, cfg.datasets) == (8, 1e-4, ["a.jsonl"])  # flags override the YAML


@pytest.mark.slow
def test_tiny_full_finetune_then_generate_cli(tmp_path):
    """train.py (full fine-tuning, packing, eval) -> model dir in HF layout -> generate.py reads it."""
    make_tiny_run_model(tmp_path / "m")
    write_chat_data(tmp_path / "d.jsonl", 24)
    out = tmp_path / "full"
    r = run_train(["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--lora", "false",
                   "--packing", "true", "--max_len", "128", "--val_set_size", "4", "--max_steps", "20",
                   "--lr", "3e-3", "--output_dir", str(out), "--sample_prompts", "What is 3 plus 3?",
                   "--sample_prompts_file", "", "--cache_dir", ""])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train_losses = [x["loss"] for x in rows if "loss" in x]
    assert train_losses[-1] < train_losses[0]
    assert any("eval_loss" in x for x in rows) and "packing_efficiency" in r.stderr
    assert json.load(open(out / "samples.json"))[0]["prompt"] == "What is 3 plus 3?"
    g = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", str(out / "model"),
                        "--prompt", "What is 3 plus 3?", "--max_new_tokens", "8"], capture_output=True, text=True)
    assert g.returncode == 0 and g.stdout.strip(), g.stderr


@pytest.mark.slow
@pytest.mark.default_model
def test_default_job_changes_the_default_models_identity(tmp_path):
    """`python train.py` (only the output dir moved): SmolLM2-135M-Instruct + the bundled identity set."""
    out = tmp_path / "default"
    r = run_train(["--output_dir", str(out)], timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if "loss" in x]
    first, last = sum(x["loss"] for x in rows[:3]) / 3, sum(x["loss"] for x in rows[-3:]) / 3
    assert last < first / 4, (first, last)
    samples = json.load(open(out / "samples.json"))
    assert len(samples) == 3
    for s in samples:  # held-out phrasings: the new identity shows after, never before
        assert "Nano" not in s["before"] and "Nano" in s["after"], s
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    check_exports_of_the_default_job(out, samples)


def check_exports_of_the_default_job(out, samples):
    """The fine-tuned default model as a merged HF directory (transformers gives nanotune's logits) and as a
    q8_0 GGUF that llama.cpp runs with the new identity."""
    import transformers
    import lora
    r = subprocess.run([sys.executable, "export.py", "--run", str(out), "--format", "merged", "--dtype", "float32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = lora.load_adapter(formats.load_model(None), str(out / "adapter"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    tok = formats.load_tokenizer(str(out / "merged"))
    ids = torch.tensor([tok.chat([{"role": "user", "content": samples[0]["prompt"]}])])
    with torch.no_grad():  # W + s B A rounded to fp32 once (merged) vs the two paths: relative to the logits'
        want = ours.logits(ours(ids))  # size (~25 here; 1.0e-4 absolute was measured in session 8)
        assert (hf(input_ids=ids).logits - want).abs().max() < 1e-5 * want.abs().max()
    llama_cpp = pytest.importorskip("llama_cpp")
    r = subprocess.run([sys.executable, "export.py", "--run", str(out), "--format", "gguf", "--quant", "q8_0",
                        "--ollama", "--verify"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("verify (llama.cpp)") == 3 and "top-1 same" in r.stdout, r.stdout
    assert "FROM ./model-q8_0.gguf" in (out / "Modelfile").read_text()
    llm = llama_cpp.Llama(model_path=str(out / "model-q8_0.gguf"), n_ctx=512, verbose=False, n_threads=2)
    for s in samples:
        prompt = tok.chat([{"role": "user", "content": s["prompt"]}])
        text = "".join(llm.detokenize([t]).decode("utf-8", "replace") for t in _greedy(llm, prompt, tok.stop_ids, 40))
        assert "Nano" in text, (s["prompt"], text)


def _greedy(llm, prompt, stops, n):
    out = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if t in stops or len(out) >= n:
            break
        out.append(t)
    return out


@pytest.mark.slow
def test_moe_trains_lora_on_the_experts(tmp_path):
    """A tiny Qwen3-MoE run with the default targets adapts the routed experts (the startup line says so), the
    loss falls and the experts' B moved off zero, with the experts in 16 bits and in NF4 (QLoRA); leaving the
    experts out gets the warning."""
    from safetensors.torch import load_file
    make_tiny_run_model(tmp_path / "m", "qwen3_moe")
    write_chat_data(tmp_path / "d.jsonl", 16)
    common = ["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--max_len", "64",
              "--lr", "3e-3", "--sample_prompts_file", "", "--cache_dir", ""]
    r = run_train(common + ["--max_steps", "12", "--output_dir", str(tmp_path / "a")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "experts.down_proj, experts.gate_up_proj" in r.stderr and "no adapter reaches" not in r.stderr
    losses = [x["loss"] for x in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")) if "loss" in x]
    assert losses[-1] < 0.9 * losses[0]
    sd = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    expert_b = [v for k, v in sd.items() if ".experts." in k and "lora_B" in k]
    assert len(expert_b) == 2 * 2 and all(v.abs().max() > 0 for v in expert_b)  # 2 layers x gate_up, down
    r = run_train(common + ["--max_steps", "12", "--load_in_4bit", "true", "--output_dir", str(tmp_path / "q")])
    assert r.returncode == 0, r.stderr[-2000:]  # QLoRA: the experts in NF4, their adapters trained
    losses = [x["loss"] for x in map(json.loads, open(tmp_path / "q" / "metrics.jsonl")) if "loss" in x]
    assert losses[-1] < 0.9 * losses[0] and "experts.gate_up_proj" in r.stderr
    r = run_train(common + ["--max_steps", "1", "--lora_targets", "q_proj,v_proj", "--output_dir", str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: no adapter reaches the routed experts" in r.stderr


def peft_reads_the_adapter(hf, m, adapter):
    """m (nanotune, the adapter loaded) differs from the base hf, and peft on hf with the adapter gives m's logits."""
    from peft import PeftModel
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, base = m.eval().logits(m(ids)), hf(input_ids=ids).logits
        assert (base - ours).abs().max() > 1e-2  # (the adapter moved the logits)
        pm = PeftModel.from_pretrained(hf, str(adapter)).eval()
        assert (pm(input_ids=ids).logits - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_gpt_oss_trains_lora_on_the_experts_and_peft_reads_the_adapter(tmp_path):
    """A tiny gpt-oss run (sinks, biased experts, clamped SwiGLU, sliding / full layers) with the default targets:
    the loss falls, the experts' adapters moved, and the adapter loads in peft on transformers' gpt-oss (its
    input-major, interleaved gate_up_proj) with nanotune's logits."""
    import lora
    from names import adapter_names
    hf = make_tiny_run_model(tmp_path / "m", "gpt_oss")
    write_chat_data(tmp_path / "d.jsonl", 16)
    r = run_train(["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--max_len", "64",
                   "--lr", "3e-3", "--sample_prompts_file", "", "--cache_dir", "", "--max_steps", "24",
                   "--output_dir", str(tmp_path / "a")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "experts.down_proj, experts.gate_up_proj" in r.stderr
    losses = read_losses(tmp_path / "a")
    assert losses[-1] < losses[0] - 0.3  # (4.91 -> 4.43: this tiny gpt-oss learns slower than the other MoEs)
    m = formats.load_model(str(tmp_path / "m"))
    lora.load_adapter(m, str(tmp_path / "a" / "adapter"), **adapter_names(m.config, saving=False))
    assert all(b.abs().max() > 0 for _, e in lora.lora_layers(m) if isinstance(e, lora.LoRAExperts)
               for _, b in e.pairs())
    peft_reads_the_adapter(hf, m, tmp_path / "a" / "adapter")


@pytest.mark.slow
def test_qwen3_5_trains_lora_on_its_linear_attention_and_peft_reads_the_adapter(tmp_path):
    """A tiny Qwen3.5 (Gated DeltaNet on layers 0 and 2, gated attention on 1 and 3), packed rows, the default
    targets: the startup line names the linear attention's projections, the loss falls, every adapter moved, and
    peft on transformers' Qwen3.5 reads the adapter with nanotune's logits; QLoRA (the linear attention in NF4) too."""
    import lora
    from names import adapter_names
    hf = make_tiny_run_model(tmp_path / "m", "qwen3_5_text")
    write_chat_data(tmp_path / "d.jsonl", 16)
    common = ["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--max_len", "64",
              "--lr", "3e-3", "--sample_prompts_file", "", "--cache_dir", "", "--max_steps", "12", "--packing", "true"]
    for out, extra in (("a", []), ("q", ["--load_in_4bit", "true"])):
        r = run_train(common + extra + ["--output_dir", str(tmp_path / out)])
        assert r.returncode == 0, r.stderr[-2000:]
        assert "in_proj_qkv" in r.stderr and "in_proj_z" in r.stderr and "out_proj" in r.stderr
        losses = read_losses(tmp_path / out)
        assert losses[-1] < 0.9 * losses[0], losses
    m = formats.load_model(str(tmp_path / "m"))
    lora.load_adapter(m, str(tmp_path / "a" / "adapter"), **adapter_names(m.config, saving=False))
    assert len(lora.lora_layers(m)) == 7 * 2 + 6 * 2 and all(b.abs().max() > 0 for _, e in lora.lora_layers(m)
                                                              for _, b in e.pairs())
    peft_reads_the_adapter(hf, m, tmp_path / "a" / "adapter")


@pytest.mark.slow
def test_a_chat_template_that_never_ends_stops_the_run_in_one_sentence(tmp_path):
    """A model whose own chat template loops without end (it came with the download): train.py stops in one
    sentence, exit 1, in seconds (it hung before), and writes no result."""
    from conftest import save_tiny_tokenizer
    make_tiny_run_model(tmp_path / "m")
    save_tiny_tokenizer(tmp_path / "m", template="{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}"
                                                 "{% endfor %}")
    write_chat_data(tmp_path / "d.jsonl", 4)
    r = run_train(["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--max_steps", "1",
                   "--sample_prompts_file", "", "--cache_dir", "", "--output_dir", str(tmp_path / "o")], timeout=120)
    assert r.returncode == 1 and "stopped at 1,000,000 steps" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o" / "adapter")


@pytest.mark.slow
@pytest.mark.default_model
def test_a_template_whose_turn_end_the_tokenizer_lacks_is_refused(tmp_path, smollm_gguf):
    """--chat_template llama3 on SmolLM2 (no <|eot_id|> token) trained a model that never stops; now one sentence."""
    r = run_train(["--chat_template", "llama3", "--max_steps", "1", "--output_dir", str(tmp_path / "o"),
                   "--sample_prompts_file", ""], timeout=300)
    assert r.returncode == 1 and "ends turns with <|eot_id|>, which is not a token" in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


SLOW_DRIVER = """
import sys, time
sys.argv = ["train.py"] + sys.argv[1:]
import train
orig = train.train_step
train.train_step = lambda *a, **k: (time.sleep(0.5), orig(*a, **k))[1]
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_resume_refuses_changed_data_and_two_runs_never_share_a_directory(tmp_path):
    """The dataset file edited in place (same path, same number of records) between a run and its --resume: one
    sentence, unless --resume_other_data says so knowingly. A second run started into a directory a running run
    holds stops in one sentence instead of interleaving its metrics with the first's."""
    make_tiny_run_model(tmp_path / "m")
    write_chat_data(tmp_path / "d.jsonl")
    common = ["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--max_steps", "6",
              "--micro_batch_size", "2", "--save_steps", "3", "--sample_prompts_file", "", "--cache_dir", "",
              "--output_dir", str(tmp_path / "run")]
    assert run_train(common).returncode == 0
    subprocess.run(["rm", "-rf", str(tmp_path / "run" / "adapter")])
    text = (tmp_path / "d.jsonl").read_text()
    (tmp_path / "d.jsonl").write_text(text.replace("It is", "That is"))
    r = run_train(common + ["--resume"])
    assert r.returncode == 1 and "the training data differs from the data" in r.stderr, r.stderr[-2000:]
    r = run_train(common + ["--resume", "--resume_other_data", "true"])
    assert r.returncode == 0, r.stderr[-2000:]
    first = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, *common[:-1], str(tmp_path / "busy")], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the first run holds the directory
            if os.path.exists(tmp_path / "busy" / "metrics.jsonl"):
                break
            time.sleep(0.1)
        r = run_train(common[:-1] + [str(tmp_path / "busy"), "--overwrite"])
        assert r.returncode == 1 and "is in use by another run" in r.stderr, r.stderr[-2000:]
    finally:
        first.kill()
        first.wait()


def tiny_full_run(tmp_path, out, *flags):
    """train.py fully fine-tuning a tiny model on tmp_path's chat data into `out`."""
    make_tiny_run_model(tmp_path / "m")
    write_chat_data(tmp_path / "d.jsonl")
    return run_train(["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "d.jsonl"), "--lora", "false",
                      "--sample_prompts_file", "", "--cache_dir", "", "--output_dir", str(out), *flags])


@pytest.mark.slow
def test_a_run_whose_gradient_dies_says_so(tmp_path):
    """Full fine-tuning at lr 1e3 saturates the tiny model after one step and the gradient is 0 from then on (fp32;
    bf16 on a GPU overflows to a NaN norm instead, which stops the run): the run says so on a line of its own
    instead of finishing as if it trained."""
    r = tiny_full_run(tmp_path, tmp_path / "o", "--lr", "1e3", "--max_steps", "16", "--dtype", "float32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(line.startswith("warning: the gradient has been exactly 0 for 10 steps")
               for line in r.stderr.replace("\r", "\n").splitlines()), r.stderr[-2000:]


@pytest.fixture
def nearly_full_disk(tmp_path):
    """A 2 MiB filesystem with about 150 KiB left (a tmpfs; the test is skipped where mounting is not allowed)."""
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("needs a small filesystem (mount -t tmpfs, as root)")
    try:
        import shutil
        (d / "filler").write_bytes(b"\0" * (shutil.disk_usage(d).free - 150 * 1024))
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)])


@pytest.mark.slow
def test_a_full_disk_is_one_sentence_and_leaves_nothing_half_written(tmp_path, nearly_full_disk):
    """The disk fills while a checkpoint or a merged export is written: one sentence naming the path and the
    space, exit 1, and no temp directory left taking the space (before: SafetensorError / RuntimeError tracebacks)."""
    r = tiny_full_run(tmp_path, nearly_full_disk / "run", "--max_steps", "4", "--save_steps", "2")
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the disk holding") and "step-000002 is full" in last and "KiB free" in last, last
    assert "Traceback" not in r.stderr and not os.listdir(nearly_full_disk / "run" / "checkpoints")
    e = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--model", str(tmp_path / "m"),
                        "--format", "merged", "--dtype", "float32", "--out", str(nearly_full_disk / "merged")],
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 1 and "merged is full" in e.stderr and "Traceback" not in e.stderr, e.stderr[-2000:]
    assert sorted(os.listdir(nearly_full_disk)) == ["filler", "run"]
