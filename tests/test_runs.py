"""A run's output is never wrong, mixed or half-written: non-finite losses and weights stop it, checkpoints hold
no code, an output dir holding a run is only resumed (same settings) or overwritten, results appear whole, and
the chat template set for a run reaches everything the run writes."""
import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, make_tiny_run_model, write_sums_chat

import dpo
import export
import lora
import formats
import runs
import tokenizer
import train
from cli import NanotuneError


@pytest.fixture
def tiny(tmp_path):
    """A tiny model directory and a chat dataset; run(args) trains in this process."""
    make_tiny_run_model(tmp_path / "m")
    write_sums_chat(tmp_path / "d.jsonl", 12)
    return tmp_path


PREFS = os.path.join(ROOT, "examples", "preferences.jsonl")


def run(tiny, out, *args, script=train):
    argv = ["--model", str(tiny / "m"), "--datasets", str(tiny / "d.jsonl"), "--max_steps", "3",
            "--micro_batch_size", "2", "--output_dir", str(tiny / out), "--sample_prompts_file", "",
            "--cache_dir", "", *args]
    if script is dpo:
        argv = [a if a != str(tiny / "d.jsonl") else PREFS for a in argv]
        argv[argv.index("--cache_dir"):argv.index("--cache_dir") + 2] = []
        argv += ["--val_set_size", "0"]
    script.main(argv)


def metric_rows(path):
    """metrics.jsonl as strict JSON (Python's json reads NaN and Infinity unless told not to)."""
    def refuse(c):
        raise AssertionError(f"{path} holds {c}, which is not JSON")
    return [json.loads(ln, parse_constant=refuse) for ln in open(path)]


# ---------------------------------------------------------------------------------------------
# non-finite values
@pytest.mark.parametrize("args", [["--lora", "false", "--lr", "1e30", "--max_grad_norm", "0"],
                                  ["--lr", "1e30", "--max_grad_norm", "0"]])
def test_a_run_that_diverges_stops_and_writes_no_result(tiny, args):
    with pytest.raises(NanotuneError, match=r"^(step \d+: the (loss|gradient norm)|after the last step: \d+ "
                                                r"trained weights are not finite)"):
        run(tiny, "out", *args, "--max_steps", "6")
    assert not (tiny / "out" / "model").exists() and not (tiny / "out" / "adapter").exists()
    assert metric_rows(tiny / "out" / "metrics.jsonl")


def test_a_non_finite_step_keeps_the_last_good_checkpoint(tiny, monkeypatch):
    orig = train.train_step

    def step(*a, **k):
        out = orig(*a, **k)
        return (float("nan"), *out[1:]) if a[2].last_epoch == 5 else out  # the 5th step's loss is NaN

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(NanotuneError, match="step 5: the loss nan; stopped without saving"):
        run(tiny, "out", "--max_steps", "8", "--save_steps", "2")
    assert runs.finished_checkpoints(str(tiny / "out" / "checkpoints")) == ["step-000002", "step-000004"]
    assert not (tiny / "out" / "adapter").exists()
    assert [r["step"] for r in metric_rows(tiny / "out" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_non_finite_base_weight_is_named_at_load(tiny):
    from safetensors.torch import load_file, save_file
    f = tiny / "m" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(NanotuneError, match="tensor 'model.layers.1.mlp.up_proj.weight' holds 1 non-finite"):
        formats.load_model(str(tiny / "m"))


def test_dpo_with_a_huge_beta_stops_at_the_non_finite_loss(tiny):
    with pytest.raises(NanotuneError, match=r"step \d+: the (loss|gradient norm) (inf|nan)"):
        run(tiny, "dpo", "--beta", "1e38", script=dpo)
    assert not (tiny / "dpo" / "adapter").exists()


def test_verify_fails_on_non_finite_or_distant_logits(tiny, monkeypatch, capsys):
    m, tok = formats.load(str(tiny / "m"))
    ids = [tok.chat([{"role": "user", "content": p}]) for p in export.VERIFY_PROMPTS]
    exact = [export.next_token_logits(m, p) for p in ids]
    monkeypatch.setattr(export, "reader_logits", lambda *a: ("test", [x.clone() for x in exact]))
    export.verify("merged", "x", m, tok, None, "float32")
    assert "verify: passed" in capsys.readouterr().out
    g = torch.Generator().manual_seed(0)
    for bad in (lambda x: x * float("nan"), lambda x: x + torch.randn(x.shape, generator=g) * x.abs().max() * 0.3):
        monkeypatch.setattr(export, "reader_logits", lambda *a, bad=bad: ("test", [bad(x) for x in exact]))
        with pytest.raises(NanotuneError, match="verify failed: test's reading of x differs .* on 3 of 3"):
            export.verify("merged", "x", m, tok, None, "float32")


# ---------------------------------------------------------------------------------------------
# checkpoints hold no code
class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_resume_never_runs_code_from_a_checkpoint(tiny, monkeypatch):
    monkeypatch.chdir(tiny)
    run(tiny, "out", "--save_steps", "2", "--max_steps", "4")
    state = tiny / "out" / "checkpoints" / "step-000002" / "state.pt"
    s = torch.load(state, weights_only=True)
    s["evil"] = Payload()
    torch.save(s, state)  # unpickled with weights_only=False, this runs `touch PWNED`
    with pytest.raises(NanotuneError, match="state.pt could not be loaded as plain training state"):
        run(tiny, "out", "--save_steps", "2", "--max_steps", "4", "--resume")
    assert not (tiny / "PWNED").exists()


def test_no_load_path_unpickles_code():
    import glob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for f in glob.glob(os.path.join(root, "*.py")):
        for n, line in enumerate(open(f), 1):
            if "torch.load(" in line and "def " not in line:
                assert "weights_only=True" in line, f"{f}:{n}: {line.strip()}"


# ---------------------------------------------------------------------------------------------
# an output dir holding a run
def test_an_output_dir_holding_a_run_is_refused_then_overwritten(tiny):
    run(tiny, "out")
    with pytest.raises(NanotuneError, match=r"output_dir '.*out' holds an earlier run \(config.yaml, "
                                                r"metrics.jsonl, adapter[,)].* pass --resume .* --overwrite"):
        run(tiny, "out", "--lr", "1e-2")
    run(tiny, "out", "--lr", "1e-2", "--max_steps", "2", "--overwrite")
    assert [r["step"] for r in metric_rows(tiny / "out" / "metrics.jsonl")] == [1, 2]
    with pytest.raises(NanotuneError, match="--resume continues the run in output_dir and --overwrite"):
        run(tiny, "out", "--overwrite", "--resume")


def test_resume_refuses_other_training_settings_and_records_what_ran(tiny):
    run(tiny, "out", "--save_steps", "2", "--max_steps", "4")  # a checkpoint at step 2 (the last step saves none)
    with pytest.raises(NanotuneError, match=r"--resume: .*step-000002 was trained with other settings: "
                                                r"lr \(0.001 there, 0.1 now\), max_steps \(4 there, 6 now\)"):
        run(tiny, "out", "--save_steps", "2", "--max_steps", "6", "--lr", "1e-1", "--resume")
    run(tiny, "out", "--save_steps", "2", "--max_steps", "4", "--log_steps", "2", "--resume",
        "--sample_max_tokens", "4")  # settings that change nothing trained may differ
    import yaml
    saved = yaml.safe_load(open(tiny / "out" / "config.yaml"))
    assert saved["lr"] == 0.001 and saved["dtype"] == "float32" and saved["log_steps"] == 2


def test_resume_truncates_the_metrics_to_the_checkpoint(tiny):
    run(tiny, "out", "--save_steps", "2", "--max_steps", "5", "--save_total_limit", "5")
    shutil.rmtree(tiny / "out" / "checkpoints" / "step-000004")  # as if killed after step 5, saved at 2
    run(tiny, "out", "--save_steps", "2", "--max_steps", "5", "--save_total_limit", "5", "--resume")
    assert [r["step"] for r in metric_rows(tiny / "out" / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_the_result_directory_appears_only_when_complete(tiny, monkeypatch):
    def dies(model, out_dir, **kw):
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, "adapter_config.json"), "w").write("{")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(lora, "save_adapter", dies)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, "out")
    assert not (tiny / "out" / "adapter").exists()


# ---------------------------------------------------------------------------------------------
# the run's chat template reaches everything it writes
def test_the_chat_template_reaches_samples_saves_dpo_and_the_modelfile(tiny, monkeypatch):
    from conftest import save_tiny_tokenizer
    save_tiny_tokenizer(tiny / "m", extra_specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    llama3 = tokenizer.BUILTIN_TEMPLATES["llama3"]
    seen = []
    orig = train.answer_prompts
    monkeypatch.setattr(train, "answer_prompts", lambda m, tok, *a: seen.append(tok.chat_template) or orig(m, tok, *a))
    run(tiny, "out", "--chat_template", "llama3", "--sample_prompts", "Hi", "--sample_max_tokens", "2")
    assert seen == [llama3, llama3]  # before and after
    saved = tiny / "out" / "adapter"
    assert json.load(open(saved / "tokenizer_config.json"))["chat_template"] == llama3
    assert (saved / "chat_template.jinja").read_text() == llama3
    export.main(["--run", str(tiny / "out"), "--format", "gguf", "--quant", "f32", "--ollama"])
    assert "<|start_header_id|>" in (tiny / "out" / "Modelfile").read_text()
    cfg = train.parse_config(["--model", str(tiny / "m"), "--chat_template", "llama3", "--output_dir",
                              str(tiny / "dpo"), "--val_set_size", "0"], dpo.DPOConfig)
    _, tok, _ = train.setup(cfg)
    assert tok.chat_template == llama3
    prompt = dpo.preference_pairs(PREFS, tok)[0]["prompt"]  # (its specials are tokens now: decode skips them)
    assert prompt[prompt.index(tok.token_id("<|start_header_id|>")) + 1:][:1] == tok.encode("user")[:1]
