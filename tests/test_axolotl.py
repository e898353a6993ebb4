"""axolotl.py: Axolotl YAML configs (written here in Axolotl's documented format, as its examples/*.yml are) build the
same run config as the hand-written nanotune YAML, train, and name every key nanotune ignores or refuses."""
import os

import pytest
from conftest import make_tiny_run_model, read_losses

import dpo
import train
from cli import NanotuneError, parse_config

LORA = """\
base_model: {model}
load_in_8bit: false
load_in_4bit: false
strict: false
datasets:
  - path: {data}
    type: chat_template
    field_messages: messages
    roles_to_train: ["assistant"]
    train_on_eos: turn
chat_template: chatml
dataset_prepared_path:
val_set_size: 0.1
output_dir: {out}
adapter: lora
lora_model_dir:
sequence_len: 256
sample_packing: true
eval_sample_packing: true
pad_to_sequence_len: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
  - q_proj
  - v_proj
  - gate_proj
wandb_project:
wandb_entity:
gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 1
max_steps: 2
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
bf16: false
fp16:
tf32: false
gradient_checkpointing: false
logging_steps: 1
flash_attention: false
warmup_steps: 1
weight_decay: 0.0
special_tokens:
  pad_token: "<|endoftext|>"
"""
LORA_NANOTUNE = """\
model: {model}
datasets: [{{path: {data}, type: messages}}]
roles_to_train: [assistant]
chat_template: chatml
val_set_size: 0.1
output_dir: {out}
lora: true
load_in_4bit: false
max_len: 256
packing: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_targets: [q_proj, v_proj, gate_proj]
grad_accum: 2
micro_batch_size: 2
epochs: 1
max_steps: 2
schedule: cosine
lr: 0.0002
train_on_inputs: false
gradient_checkpointing: false
log_steps: 1
warmup_steps: 1
weight_decay: 0.0
"""
QLORA = """\
base_model: {model}
datasets:
  - path: {data}
    type: alpaca
adapter: qlora
sequence_len: 128
lora_r: 4
lora_alpha: 8
lora_target_linear: true
peft_use_rslora: true
micro_batch_size: 1
gradient_accumulation_steps: 1
max_steps: 2
learning_rate: 0.001
lr_scheduler: linear
warmup_ratio: 0.1
output_dir: {out}
seed: 7
"""
QLORA_NANOTUNE = """\
model: {model}
datasets: [{{path: {data}, type: alpaca}}]
lora: true
load_in_4bit: true
max_len: 128
lora_r: 4
lora_alpha: 8
lora_targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
use_rslora: true
micro_batch_size: 1
grad_accum: 1
max_steps: 2
lr: 0.001
schedule: linear
warmup_ratio: 0.1
output_dir: {out}
seed: 7
"""
DPO = """\
base_model: {model}
rl: dpo
dpo_beta: 0.2
datasets:
  - path: {data}
    split: train
    type: chatml.intel
adapter: lora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
sequence_len: 256
micro_batch_size: 2
max_steps: 2
learning_rate: 0.0001
output_dir: {out}
"""
DPO_NANOTUNE = """\
model: {model}
loss: dpo
beta: 0.2
rpo_alpha: 0.0
datasets: [{{path: {data}}}]
lora: true
load_in_4bit: false
lora_r: 8
lora_alpha: 16
lora_targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
max_len: 256
micro_batch_size: 2
max_steps: 2
lr: 0.0001
output_dir: {out}
"""


def configs(tmp_path, axolotl, ours, cls, data):
    kw = dict(model=tmp_path / "m", data=data, out=tmp_path / "out")
    (tmp_path / "a.yml").write_text(axolotl.format(**kw))
    (tmp_path / "n.yml").write_text(ours.format(**kw))
    return parse_config(["--config", str(tmp_path / "a.yml")], cls), parse_config(
        ["--config", str(tmp_path / "n.yml")], cls)


@pytest.mark.parametrize("name", ["lora", "qlora", "dpo"])
def test_an_axolotl_config_builds_the_nanotune_config_a_user_would_write(name, tmp_path, capsys):
    """Axolotl's LoRA (chat_template data, packing, its null keys), QLoRA (alpaca, lora_target_linear, rsLoRA) and
    DPO (rl: dpo) configs give exactly the run config of the nanotune YAML written by hand; the keys nanotune has no
    use for are named in one line each."""
    axo, ours, cls, data = {"lora": (LORA, LORA_NANOTUNE, train.TrainConfig, "d.jsonl"),
                            "qlora": (QLORA, QLORA_NANOTUNE, train.TrainConfig, "d.jsonl"),
                            "dpo": (DPO, DPO_NANOTUNE, dpo.DPOConfig, "p.jsonl")}[name]
    got, want = configs(tmp_path, axo, ours, cls, data)
    assert got == want
    err = capsys.readouterr().err
    if name == "lora":  # (one line per key that changes nothing nanotune computes)
        for key in ("strict", "eval_sample_packing", "pad_to_sequence_len", "optimizer", "tf32", "flash_attention",
                    "special_tokens"):
            assert sum(f"Axolotl's {key}" in line for line in err.splitlines()) == 1, (key, err)
    if name == "dpo":
        assert "Axolotl's datasets type 'chatml.intel' is ignored" in err


@pytest.mark.parametrize("key,value,says", [
    ("load_in_8bit", "true", "use load_in_4bit"), ("lr_scheduler", "one_cycle", "cosine, linear or constant"),
    ("optimizer", "lion_8bit", "nanotune trains with AdamW"),
    ("rl", "dpo", "preference training runs in dpo.py"), ("rope_scaling", "{type: linear}", "remove it, or set"),
    ("special_tokens", "{bos_token: '<s>', eos_token: '</s>'}", "add the tokens to the tokenizer")])
def test_an_axolotl_key_nanotune_does_not_implement_is_refused_in_one_sentence(key, value, says, tmp_path):
    (tmp_path / "a.yml").write_text(QLORA.format(model="m", data="d.jsonl", out="o") + f"{key}: {value}\n")
    with pytest.raises(NanotuneError, match=f"a.yml: Axolotl's {key}.* is not supported by nanotune; .*{says}"):
        parse_config(["--config", str(tmp_path / "a.yml")], train.TrainConfig)


@pytest.mark.slow
def test_an_axolotl_config_trains(tmp_path):
    """train.py --config on Axolotl's LoRA example (a tiny model, the issue's two steps): the run ends, its loss is
    logged for both steps, the adapter is written; the printed config is nanotune's."""
    from test_train import run_train, write_chat_data
    make_tiny_run_model(tmp_path / "m")
    write_chat_data(tmp_path / "d.jsonl", 16)
    (tmp_path / "a.yml").write_text(LORA.format(model=tmp_path / "m", data=tmp_path / "d.jsonl", out=tmp_path / "o"))
    r = run_train(["--config", str(tmp_path / "a.yml"), "--sample_prompts_file", "", "--cache_dir", ""])
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_losses(tmp_path / "o")) == 2
    assert os.path.exists(tmp_path / "o" / "adapter" / "adapter_model.safetensors")
    assert "lora_targets" in r.stderr and "Axolotl's wandb" not in r.stderr  # (null keys: unset, not named)


def test_warmup_ratio_warms_up_over_its_share_of_the_steps():
    """warmup_ratio (Axolotl's and transformers' key): ceil(ratio x steps) warmup steps when warmup_steps is 0 (21
    steps at 0.1: 3), then the schedule; warmup_steps wins when both are set."""
    import torch
    cfg = train.TrainConfig(warmup_ratio=0.1, schedule="constant")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = train.make_schedule(opt, cfg, 21)
    got = []
    for _ in range(5):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == [0.25, 0.5, 0.75, 1.0, 1.0]
    cfg.warmup_steps = 1
    assert train.make_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), cfg, 21).get_last_lr() \
        == [0.5]
