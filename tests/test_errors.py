"""Bad input (models, flags, YAML, data, files) ends with one clear sentence naming what, where and how to fix
it, and exit 1, never a traceback; a legal but pointless value is refused the same way."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ARCH_CONFIGS, ROOT, families, make_hf_model, save_tiny_tokenizer

import data
import formats
from cli import NanotuneError


def run_generate(model_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", str(model_path),
                        "--max_new_tokens", "2"], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip()


def truncated_safetensors(tmp_path):
    make_hf_model("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return tmp_path


def truncated_gguf(tmp_path, src):
    with open(src, "rb") as f:
        head = f.read(4 << 20)  # header, metadata and a few tensors; the rest is missing
    (tmp_path / "cut.gguf").write_bytes(head)
    return tmp_path / "cut.gguf"


def unsupported_type(tmp_path):
    make_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"),
    ("no_config", "has no config.json"),
    ("unsupported", "model_type 'bert' is not supported"),
    ("truncated_safetensors", "truncated or corrupt"),
    ("truncated_gguf", "truncated or corrupt"),
])
@pytest.mark.slow
def test_bad_model_input_is_one_clear_line(case, expect, tmp_path, smollm_gguf):
    path = {"missing": lambda: tmp_path / "nope",
            "no_config": lambda: tmp_path,
            "unsupported": lambda: unsupported_type(tmp_path),
            "truncated_safetensors": lambda: truncated_safetensors(tmp_path),
            "truncated_gguf": lambda: truncated_gguf(tmp_path, smollm_gguf)}[case]()
    rc, err = run_generate(path)
    assert rc == 1
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expect in err, err


# ---------------------------------------------------------------------------------------------
# flags and YAML: a wrong or pointless value is refused in one sentence naming the flag and the legal range
@pytest.mark.parametrize("args,expect", [
    (["--lora_r", "0"], "--lora_r 0 is out of range; use a whole number >= 1"),
    (["--lora_dropout", "2"], "--lora_dropout 2.0 is out of range; use in [0, 1)"),
    (["--lr", "-1"], "--lr -1.0 is out of range; use a number > 0"),
    (["--lr", "nan"], "--lr nan is out of range"),
    (["--dtype", "float33"], "--dtype 'float33' is out of range; use auto, float32, bfloat16, float16"),
    (["--device", "bogus"], "--device 'bogus' is out of range; use auto, cpu, cuda or cuda:N"),
    (["--micro_batch_size", "0"], "--micro_batch_size 0 is out of range"),
    (["--micro_batch_size", "-1"], "--micro_batch_size -1 is out of range"),
    (["--log_steps", "0"], "--log_steps 0 is out of range"),
    (["--max_len", "0"], "--max_len 0 is out of range"),
    (["--max_steps", "-3"], "--max_steps -3 is out of range"),
    (["--grad_accum", "0"], "--grad_accum 0 is out of range"),
    (["--save_steps", "-1"], "--save_steps -1 is out of range"),
    (["--val_set_size", "-0.1"], "--val_set_size -0.1 is out of range"),
    (["--val_set_size", "1.5"], "--val_set_size 1.5 is out of range; use a fraction in [0, 1) or a whole count"),
    (["--truncation", "chop"], "--truncation 'chop' is out of range; use truncate or drop"),
    (["--lerning_rate", "1"], "unknown flag --lerning_rate (did you mean --lr?)"),
    (["--bacth_size", "1"], "unknown flag --bacth_size (did you mean --micro_batch_size?)"),
    (["--lr"], "argument --lr/--learning_rate: expected one argument"),
])
def test_bad_flags_are_refused_in_one_sentence(args, expect):
    import train
    with pytest.raises(NanotuneError) as e:
        train.parse_config(args, train.TrainConfig)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("yaml_text,expect", [
    ("lr: null\n", "lr needs a value (float)"),
    ("- lr: 1\n", "the top level must be a mapping of keys"),
    ("micro_batch_size: true\n", "micro_batch_size must be int, got True"),
    ("lr: [1]\n", "lr must be float, got [1]"),
    ("lora_r: 0\n", "run.yaml: lora_r 0 is out of range"),
    ("learning_rate: 1e-4\nlr: 1e-3\n", "'lr' and another key both set lr"),
])
def test_bad_yaml_values_are_checked_as_flags_are(yaml_text, expect, tmp_path):
    import train
    (tmp_path / "run.yaml").write_text(yaml_text)
    with pytest.raises(NanotuneError, match=re.escape(expect)):
        train.parse_config(["--config", str(tmp_path / "run.yaml")], train.TrainConfig)


def test_names_from_other_tools_are_aliases(tmp_path):
    import train
    (tmp_path / "run.yaml").write_text("num_epochs: 2\ngradient_accumulation_steps: 4\n")
    cfg = train.parse_config(["--config", str(tmp_path / "run.yaml"), "--learning_rate", "3e-4", "--batch_size", "8"],
                             train.TrainConfig)
    assert (cfg.lr, cfg.micro_batch_size, cfg.epochs, cfg.grad_accum) == (3e-4, 8, 2.0, 4)


def test_list_flags_take_commas_or_spaces(tmp_path, monkeypatch):
    """`--lora_targets q_proj,v_proj` and `--lora_targets q_proj v_proj` mean the same; the bundled defaults
    resolve from any working directory."""
    import train
    a = train.parse_config(["--lora_targets", "q_proj,v_proj"], train.TrainConfig)
    b = train.parse_config(["--lora_targets", "q_proj", "v_proj"], train.TrainConfig)
    assert a.lora_targets == b.lora_targets == ["q_proj", "v_proj"]
    import cli
    monkeypatch.chdir(tmp_path)  # (train.py's defaults are made this way when it is imported)
    assert os.path.isabs(cli.bundled("identity.jsonl")) and os.path.isfile(cli.bundled("identity.jsonl"))
    monkeypatch.chdir(ROOT)
    assert cli.bundled("identity.jsonl") == "examples/identity.jsonl"


@pytest.mark.parametrize("args,expect", [
    (["--device", "cuda:7"], "--device cuda:7: this machine has"),
    (["--sample_prompts_file", "nope.txt"], "sample_prompts_file 'nope.txt' does not exist"),
    (["--datasets", "x.jsonl:0.5", "nope.jsonl"], "dataset 'x.jsonl' does not exist"),
    (["--output_dir", "FILE"], "is a file; choose a directory name"),
    (["--sample_prompts_file", "latin1.txt"], "sample_prompts_file 'latin1.txt' is not UTF-8 text"),
    (["--sample_prompts_file", "m"], "sample_prompts_file 'm' is a directory"),
    (["--datasets", "m"], "dataset 'm' is a directory"),
    (["--seed", str(2**80)], "--seed 1208925819614629174706176 is out of range"),
])
def test_run_inputs_are_checked_before_the_model_loads(args, expect, tmp_path, monkeypatch):
    import train
    from conftest import make_tiny_run_model
    make_tiny_run_model(tmp_path / "m")
    (tmp_path / "FILE").write_text("")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(12)))
    (tmp_path / "latin1.txt").write_bytes("Grüße\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(train, "build_model", lambda *a: loaded.append(1) or pytest.fail("model loaded"))
    argv = ["--model", "m", "--datasets", "d.jsonl", "--sample_prompts_file", "", "--cache_dir", "", *args]
    with pytest.raises(NanotuneError, match=re.escape(expect)):
        train.main(argv)


def test_a_hold_out_that_leaves_nothing_to_train_is_refused():
    assert data.held_out(1.0, 12) == 1 and data.held_out(0.25, 12) == 3
    with pytest.raises(NanotuneError, match=re.escape("val_set_size 12 holds out 12 of the 12 samples and leaves "
                                                         "none to train on; use at most 11")):
        data.held_out(12.0, 12)


@pytest.mark.parametrize("args,expect", [
    (["--eval_file", "x.jsonl"], "eval_file is an SFT (train.py) setting that dpo.py does not use"),
    (["--packing", "true"], "packing is an SFT (train.py) setting"),
    (["--varlen_attention", "true"], "varlen_attention is an SFT"),
    (["--train_on_inputs", "true"], "train_on_inputs is an SFT"),
    (["--roles_to_train", "user"], "roles_to_train is an SFT"),
    (["--cache_dir", "/tmp/c"], "cache_dir is an SFT"),
    (["--datasets", "examples/preferences.jsonl:0.5"], "type and weight are SFT (train.py) dataset keys"),
    (["--beta", "0"], "--beta 0.0 is out of range; use a number > 0"),
    (["--beta", "-1"], "--beta -1.0 is out of range"),
])
def test_dpo_refuses_sft_settings_and_pointless_values(args, expect, monkeypatch):
    import dpo
    import train
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(train, "setup", lambda cfg: pytest.fail("ran"))
    with pytest.raises(NanotuneError, match=re.escape(expect)):
        dpo.main(args)


def test_dpo_on_a_small_file_keeps_a_pair_to_train_on(tmp_path, capsys):
    import dpo
    from conftest import make_tiny_run_model
    make_tiny_run_model(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": "YES", "rejected": "no"}) + "\n")
    dpo.main(["--model", str(tmp_path / "m"), "--datasets", str(tmp_path / "p.jsonl"), "--max_steps", "1",
              "--output_dir", str(tmp_path / "o")])
    assert "val_set_size 8 would hold out all 5 items; holding out 4 and training on 1" in capsys.readouterr().err
    assert (tmp_path / "o" / "adapter").is_dir()


# ---------------------------------------------------------------------------------------------
# data
@pytest.mark.parametrize("rec,expect", [
    ({"instruction": 5, "output": "x"}, "'instruction' must be a string, got int 5"),
    ({"instruction": "i", "output": ["x"]}, "'output' must be a string, got list"),
    ({"text": 3}, "'text' must be a string, got int 3"),
    ({"input_ids": ["a", "b"]}, "input_ids must be a list of token ids in [0, "),
    ({"input_ids": [1, 99999]}, "input_ids must be a list of token ids in [0, "),
    ({"input_ids": [1, 2], "labels": [1, 99999]}, "labels must be token ids in [0, "),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     "message 1 has role 'robot'; use one of system, user, assistant"),
    ({"segments": [{"text": "q", "label": "no"}, {"text": "a"}]},
     "a segment's 'label' must be true or false, got 'no'"),
])
def test_bad_records_are_named(rec, expect, tmp_path, smollm_tok):
    import data
    tok = smollm_tok
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(NanotuneError, match=re.escape(f"d.jsonl:1: {expect}")):
        data.build_dataset([str(f)], tok)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    import data
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(NanotuneError, match=re.escape("d.jsonl:2: not UTF-8 text (byte 0xe9)")):
        data.read_records(str(f))


def test_a_corrupt_tokenized_cache_is_rebuilt(tmp_path, smollm_tok, capsys):
    import data
    tok = smollm_tok
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "hello"}) + "\n")
    first, _ = data.build_dataset([str(f)], tok, cache_dir=str(tmp_path / "c"))
    for c in os.listdir(tmp_path / "c"):
        (tmp_path / "c" / c).write_bytes(b"PK\x03\x04 broken")
    again, _ = data.build_dataset([str(f)], tok, cache_dir=str(tmp_path / "c"))
    assert again == first and "could not be read; rebuilding it" in capsys.readouterr().err


def test_an_answer_starting_with_two_spaces_keeps_both_in_the_trained_span(smollm_tok):
    import data
    tok = smollm_tok
    rec = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello there"}]}
    ids, labels = data.tokenize(rec, "messages", tok)
    trained = tok.decode([t for t in labels if t != data.IGNORE], skip_special_tokens=False)
    assert trained.lstrip("\n") == "  Hello there<|im_end|>", repr(trained)


# ---------------------------------------------------------------------------------------------
# files: one line naming the path
@pytest.mark.slow
def test_a_truncated_adapter_is_one_line(tmp_path, smollm_gguf):
    from conftest import make_hf_model, save_tiny_tokenizer
    import lora
    make_hf_model("llama", tmp_path / "m")
    save_tiny_tokenizer(tmp_path / "m")
    m = formats.load_model(str(tmp_path / "m"))
    lora.apply_lora(m, r=2, alpha=4)
    lora.save_adapter(m, str(tmp_path / "a"))
    f = tmp_path / "a" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    for script in ("generate.py", "export.py"):
        extra = ["--format", "merged", "--out", str(tmp_path / "x")] if script == "export.py" else []
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--model", str(tmp_path / "m"), "--adapter",
                            str(tmp_path / "a"), *extra], capture_output=True, text=True, timeout=300)
        err = r.stderr.strip()
        assert r.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert "adapter_model.safetensors could not be read as safetensors" in err and "truncated" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_dir", "read_only"])
def test_unwritable_outputs_are_one_line(case, tmp_path):
    from conftest import make_tiny_run_model
    make_tiny_run_model(tmp_path / "m")
    if case == "no_dir":
        out = "/no/such/dir/m.gguf"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        out = str(tmp_path / "ro" / "m.gguf")
        if os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere: a path under a file fails for everyone
            (tmp_path / "f").write_text("")
            out = str(tmp_path / "f" / "m.gguf")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--model", str(tmp_path / "m"), "--format",
                        "gguf", "--quant", "f32", "--out", out], capture_output=True, text=True, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and os.path.dirname(out) in err, err


def test_moe_only_settings_are_refused_in_one_sentence(tmp_path):
    """--router_aux_loss_coef on a dense model is pointless, and a MoE GGUF that llama.cpp would run differently
    (dense layers in qwen2moe, routing weights renormalised where its arch does not) is refused: each in one
    sentence, no file left."""
    import export
    import formats
    import train
    make_hf_model("llama", tmp_path / "dense")
    cfg = train.TrainConfig(model=str(tmp_path / "dense"), router_aux_loss_coef=0.01)
    with pytest.raises(NanotuneError, match="needs a mixture-of-experts model"):
        train.build_model(cfg, torch.device("cpu"), torch.float32)
    for arch, kw, why in [("qwen2_moe", {}, r"layers \[0\] of this model are dense"),
                          ("qwen3_moe", {"norm_topk_prob": False}, "always renormalises")]:
        make_hf_model(arch, tmp_path / arch, **kw)
        save_tiny_tokenizer(tmp_path / arch)
        m, tok = formats.load_model(str(tmp_path / arch)), formats.load_tokenizer(str(tmp_path / arch))
        with pytest.raises(NanotuneError, match=why):
            export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    assert not os.path.exists(tmp_path / "m.gguf")


def bad_config(tmp_path, how):
    """A model directory whose config.json is damaged in one way."""
    from conftest import make_hf_model
    make_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if how == "list":
        (tmp_path / "config.json").write_text("[1, 2]")
    elif how == "latin1":
        text = json.dumps({**cfg, "name": "Grüße"}, ensure_ascii=False)
        (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    elif how == "no_hidden":
        del cfg["hidden_size"]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    else:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": how}))
    return tmp_path


@pytest.mark.parametrize("how,expect", [
    ("list", "holds a JSON list, not an object"), ("latin1", "is not UTF-8 text"),
    ("no_hidden", "hidden_size is missing, but a llama model needs it as a whole number > 0"),
    ("2", "num_hidden_layers is '2', but a llama model needs it"), (-2, "num_hidden_layers is -2, but"),
])
def test_a_damaged_config_json_is_one_sentence(how, expect, tmp_path):
    import formats
    with pytest.raises(NanotuneError, match=re.escape(expect)):
        formats.load_model(str(bad_config(tmp_path, how)))


def test_bad_generate_and_export_inputs_are_one_sentence(tmp_path):
    import export
    import generate
    for argv, expect in ((["--device", "tpu"], "--device 'tpu' is not one nanotune runs on"),
                         (["--max_new_tokens", "1000000000"], "--max_new_tokens 1000000000 is out of range"),
                         (["--temperature", "inf"], "--temperature inf is out of range"),
                         (["--raw", "--prompt", ""], "--raw needs a --prompt")):
        with pytest.raises(NanotuneError, match=re.escape(expect)):
            generate.main(argv)
    for text, expect in (("- a\n- b\n", "is not a train.py run config"), ("model: [x\n", "is not valid YAML")):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "config.yaml").write_text(text)
        with pytest.raises(NanotuneError, match=re.escape(expect)):
            export.main(["--run", str(tmp_path / "run"), "--format", "merged"])


def test_lora_targets_and_train_modules_that_name_nothing_are_refused(tmp_path):
    import lora
    from conftest import make_hf_model
    import formats
    make_hf_model("llama", tmp_path)
    with pytest.raises(NanotuneError, match="lora_targets is empty"):
        lora.apply_lora(formats.load_model(str(tmp_path)), r=2, alpha=2, targets=[])
    with pytest.raises(NanotuneError, match="train_modules 'nosuch' names no module"):
        lora.apply_lora(formats.load_model(str(tmp_path)), r=2, alpha=2, train_modules=["nosuch"])


def test_a_record_nested_too_deeply_is_one_sentence(tmp_path):
    (tmp_path / "deep.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(NanotuneError, match=re.escape("deep.jsonl:1: nested too deeply to be a record")):
        data.read_records(str(tmp_path / "deep.jsonl"))


UNREAD_VALUES = {"sliding_window": 4, "attn_logit_softcapping": 30.0, "final_logit_softcapping": 30.0,
                 "query_pre_attn_scalar": 7, "logits_scaling": 2.0, "embedding_multiplier": 6.0,
                 "residual_multiplier": 0.5, "attention_multiplier": 0.1, "swiglu_limit": 7.0, "use_qk_norm": True,
                 "attention_chunk_size": 8, "no_rope_layers": [1, 0], "rope_local_base_freq": 1e4, "clip_qkv": 8.0,
                 "routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
                 "moe_norm_min": 1e-3, "enable_moe_block": True, "use_bidirectional_attention": "all",
                 "attention_k_eq_v": True, "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 8,
                 "resid_pdrop": 0.1, "embd_pdrop": 0.1, "emb_pdrop": 0.1, "router_jitter_noise": 0.1,
                 "input_jitter_noise": 0.1}


@pytest.mark.parametrize("arch", families(ARCH_CONFIGS))
def test_every_family_refuses_a_key_it_does_not_implement_and_names_a_missing_one(arch, tmp_path):
    """Per family: a math-changing config.json key its row does not read, set to a value that would change the
    model, is refused in one sentence naming the key and the value; a config.json without intermediate_size or
    num_hidden_layers is one sentence naming the file and the key."""
    import families
    import keys
    make_hf_model(arch, tmp_path)
    where = str(tmp_path / "config.json")
    cfg = json.loads((tmp_path / "config.json").read_text())
    fam = families.FAMILIES[families.text_config(cfg)["model_type"]]
    unread = [k for k in keys.MATH_KEYS if k not in keys.reads(fam)]
    assert set(unread) <= set(UNREAD_VALUES)
    for k in unread:
        with pytest.raises(NanotuneError, match=re.escape(f"{where}: {k}={UNREAD_VALUES[k]!r} would change")):
            families.config_from_hf({**cfg, k: UNREAD_VALUES[k]}, where)
    for field in ("intermediate_size", "num_hidden_layers"):
        if field == "intermediate_size" and ("expansion_ratio" in fam.requires or fam.layout):  # (MPT: 4 x
            #                                                         d_model; Falcon: ffn_hidden_size, else 4 x)
            continue
        if field == "num_hidden_layers" and "hybrid_override_pattern" in fam.reads:  # (Nemotron-H: its list)
            assert families.config_from_hf({n: v for n, v in cfg.items() if n != field}, where).num_hidden_layers \
                == len(cfg["layers_block_type"])
            continue
        k = fam.keys.get(field, field)  # (Llama 4's dense width is intermediate_size_mlp)
        gone = {k} | {a for a, common in fam.aliases.items() if field in common}  # (MPT: n_layers)
        text = families.text_config({n: v for n, v in cfg.items() if n not in gone})
        for n in gone:  # (a vision-language config: from its text tower)
            text.pop(n, None)
        if k in fam.defaults:  # (Gemma 3's multimodal configs spell out only what differs from the defaults)
            assert getattr(families.config_from_hf(text, where), field) == fam.defaults[k]
            continue
        with pytest.raises(NanotuneError, match=re.escape(f"{where}: {k} is missing")):
            families.config_from_hf(text, where)


@pytest.mark.parametrize("arch", families(ARCH_CONFIGS))
def test_every_key_of_a_familys_config_is_accounted_for(arch, tmp_path, capsys):
    """No config.json key is ignored unknowingly: every key of transformers' own config for the family (its class's
    defaults and the tiny test config's values, as AutoConfig reads the saved file) is read, listed as changing
    nothing (keys.INERT, the row's inert), or a MATH_KEYS / requires key (refused unless at its no-op value),
    so loading prints no warning; a key in no list is named in one warning line, and the model still loads."""
    import transformers

    import families
    make_hf_model(arch, tmp_path)
    full = transformers.AutoConfig.from_pretrained(str(tmp_path)).to_dict()
    capsys.readouterr()
    families.config_from_hf(full, "config.json")
    assert capsys.readouterr().err == ""
    families.config_from_hf({**full, "my_new_key": 3, "another_key": None}, "c.json")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: c.json: nanotune does not know my_new_key for ")


@pytest.mark.parametrize("arch,key,value", [
    ("olmo2", "sliding_window", 4),  # an Olmo 3 config relabelled olmo2: its window would be dropped
    ("llama", "attn_logit_softcapping", 30.0), ("qwen3", "swiglu_limit", 7.0), ("llama", "embedding_multiplier", 6.0),
    ("llama", "layer_types", ["sliding_attention", "full_attention"]),
    ("mistral", "layer_types", ["chunked_attention", "full_attention"]),
    ("mpt", "no_bias", False), ("mpt", "expansion_ratio", 2),  # (MPT keys transformers itself ignores)
    ("falcon", "activation", "relu"), ("qwen2_moe", "qkv_bias", False), ("phi3", "resid_pdrop", 0.1),
])
def test_a_config_key_that_would_change_the_math_is_refused(arch, key, value, tmp_path):
    """A key nanotune's row for that model_type does not implement is refused in one sentence naming it, not
    silently dropped (the model would differ from the checkpoint's); the same key at its no-op value loads."""
    import formats
    from conftest import make_hf_model
    make_hf_model(arch, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(NanotuneError, match=re.escape(key)):
        formats.load_model(str(tmp_path))
    if key != "layer_types":
        (tmp_path / "config.json").write_text(json.dumps({**cfg, key: None}))
        formats.load_model(str(tmp_path))


def test_nemotron_h_legacy_pattern_loads_and_an_unknown_layer_type_is_refused(tmp_path):
    """Nemotron-H: a config with the legacy hybrid_override_pattern (no layers_block_type) builds the same layers
    (a dense one has no experts, whatever MoE defaults the file carries); an unknown layer type is one sentence."""
    import families
    make_hf_model("nemotron_h", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    legacy = {k: v for k, v in cfg.items() if k != "layers_block_type"}
    c = families.config_from_hf({**legacy, "hybrid_override_pattern": "M-*-"}, "c.json")
    assert c.layer_types == cfg["layers_block_type"] and c.num_hidden_layers == 4 and c.num_experts == 0
    c = families.config_from_hf({**legacy, "hybrid_override_pattern": "ME*E"}, "c.json")
    assert [c.is_sparse(i) for i in range(4)] == [False, True, False, True] and c.num_experts == 8
    with pytest.raises(NanotuneError, match=r"c.json: layers_block_type holds .*'conv'.*; Nemotron-H layers are"):
        families.config_from_hf({**cfg, "layers_block_type": ["conv", "mlp"]}, "c.json")
