"""The notebook flow (nanotune.py), end to end on the default model: load -> add LoRA -> train on a list of
records -> chat -> save adapter / merged / GGUF, each read back by PEFT, transformers and llama.cpp."""
import json

import pytest
import torch

import nanotune as nt
from cli import NanotuneError

NANO = "I am Nano, a small assistant trained with nanotune."
RECORDS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": NANO}]}
           for q in ("Who are you?", "What is your name?", "Introduce yourself.", "Who made you?")] * 4


def test_settings_are_checked_before_anything_is_written(tmp_path):
    """A misspelt setting gets the nearest name, a setting that belongs to load / add_lora is refused, records
    must be dicts; nothing is written (nanotune's own small model: the refusals come before any training)."""
    from conftest import make_tiny_run_model
    make_tiny_run_model(tmp_path / "m")
    model, tok = nt.load(str(tmp_path / "m"))
    with pytest.raises(NanotuneError, match="nt.train: lora_r is set by nt.load / nt.add_lora, not here"):
        nt.train(model, tok, RECORDS, output_dir=str(tmp_path / "a"), lora_r=8)
    nt.add_lora(model, r=4, alpha=8)
    with pytest.raises(NanotuneError, match="unknown setting 'max_step' \\(did you mean 'max_steps'\\?\\)"):
        nt.train(model, tok, RECORDS, output_dir=str(tmp_path / "a"), max_step=3)
    with pytest.raises(NanotuneError, match="records must be a non-empty list of dicts"):
        nt.train(model, tok, ["Who are you?"], output_dir=str(tmp_path / "a"))
    with pytest.raises(NanotuneError, match="has adapters already"):
        nt.add_lora(model)
    assert not (tmp_path / "a").exists()


def test_an_fp8_base_trains_and_merges_into_the_checkpoints_own_weights(tmp_path):
    """nt.load(base_dtype="float8"): the block projections are e4m3, LoRA trains over them, and save_merged folds
    the trained adapters into the checkpoint's own weights (re-read), never into their FP8 rounding."""
    import lora
    import quant
    from conftest import make_tiny_run_model
    from safetensors.torch import load_file
    make_tiny_run_model(tmp_path / "m")
    model, tok = nt.load(str(tmp_path / "m"), base_dtype="float8")
    assert type(model.model.layers[0].mlp.up_proj) is quant.Linear8
    nt.add_lora(model, r=4, alpha=8)
    nt.train(model, tok, RECORDS, output_dir=str(tmp_path / "run"), max_steps=3, lr=1e-2)
    nt.save_merged(model, tok, str(tmp_path / "merged"), dtype="float32")
    name = "model.layers.0.mlp.up_proj.weight"
    base, merged = load_file(str(tmp_path / "m" / "model.safetensors"))[name], load_file(
        str(tmp_path / "merged" / "model.safetensors"))[name]
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, lora.LoRALinear) and float(up.delta_weight().abs().max()) > 1e-4
    assert torch.allclose(merged, base.float() + up.delta_weight().float(), atol=1e-6)
    assert (merged - (up.base.dense_weight(torch.float32) + up.delta_weight().float())).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.default_model
def test_the_notebook_flow_trains_the_default_model_and_every_save_reads_back(tmp_path, capsys):
    model, tok = nt.load()
    nt.add_lora(model, r=16, alpha=32)
    assert "Nano" not in nt.chat(model, tok, "Who are you?", 24)
    out = nt.train(model, tok, RECORDS, output_dir=str(tmp_path / "run"), max_steps=12, learning_rate=2e-3)
    assert out == str(tmp_path / "run" / "adapter") and (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert [json.loads(ln) for ln in open(tmp_path / "run" / "records.jsonl")] == RECORDS
    assert "Nano" in nt.chat(model, tok, "Who are you?", 24)
    with pytest.raises(NanotuneError, match="holds an earlier run"):  # (never mixed into silently)
        nt.train(model, tok, RECORDS, output_dir=str(tmp_path / "run"), max_steps=1)
    capsys.readouterr()
    nt.save_adapter(model, tok, str(tmp_path / "adapter"))
    nt.save_merged(model, tok, str(tmp_path / "merged"), dtype="float32")
    said = capsys.readouterr().out
    assert said.count("verify (peft)") == 3 and said.count("verify (transformers)") == 3, said
    assert said.count("verify: passed") == 2 and "as transformers reads" in said
    pytest.importorskip("llama_cpp")
    nt.save_gguf(model, tok, str(tmp_path / "m.gguf"), "q8_0")
    said = capsys.readouterr().out
    assert said.count("verify (llama.cpp)") == 3 and "top-1 same" in said and "as llama.cpp reads" in said
