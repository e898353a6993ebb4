"""Axolotl YAML -> nanotune's run config: `python train.py --config axolotl.yml` (and dpo.py) take an Axolotl config
as it is. A YAML file is read as Axolotl's when it has Axolotl's own keys (base_model, sequence_len, adapter ...).
Each key nanotune has becomes its nanotune setting (the run prints the config it became); a key that changes nothing
nanotune computes (logging, hub, attention backends nanotune picks itself) is named in one line as ignored; a key
that would change the training and that nanotune does not implement is refused in one sentence saying what to do.
Reference: Axolotl's config docs (docs/config-reference.qmd) and its examples/*.yml.

    from axolotl import from_axolotl
    values, notes = from_axolotl(yaml.safe_load(open("qlora.yml")), "qlora.yml")
"""
from cli import NanotuneError
from lora import DEFAULT_TARGETS

MARKERS = ("base_model", "adapter", "lora_target_modules", "lora_target_linear", "sample_packing", "lr_scheduler",
           "rl")  # (keys only Axolotl has: train.py also takes learning_rate, sequence_len, num_epochs ... as aliases)
# Axolotl key -> nanotune field (the value as it is)
SAME = {"base_model": "model", "sequence_len": "max_len", "sample_packing": "packing", "load_in_4bit": "load_in_4bit",
        "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
        "lora_target_modules": "lora_targets", "peft_use_dora": "use_dora", "peft_use_rslora": "use_rslora",
        "micro_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs",
        "max_steps": "max_steps", "learning_rate": "lr", "warmup_steps": "warmup_steps", "warmup_ratio": "warmup_ratio",
        "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "val_set_size": "val_set_size",
        "eval_steps": "eval_steps", "save_steps": "save_steps", "output_dir": "output_dir",
        "gradient_checkpointing": "gradient_checkpointing", "seed": "seed", "logging_steps": "log_steps",
        "save_total_limit": "save_total_limit", "train_on_inputs": "train_on_inputs", "dpo_beta": "beta",
        "orpo_alpha": "beta", "rl_beta": "beta", "rpo_alpha": "rpo_alpha"}  # (ORPO's lambda is dpo.py's beta)
# keys that change nothing nanotune computes: named as ignored
IGNORED = {"base_model_config", "model_type", "tokenizer_type", "trust_remote_code", "strict", "wandb_project",
           "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "wandb_mode", "hub_model_id",
           "hub_strategy", "push_dataset_to_hub", "dataset_prepared_path", "flash_attention", "sdp_attention",
           "xformers_attention", "flex_attention", "pad_to_sequence_len", "tf32", "group_by_length",
           "early_stopping_patience", "local_rank", "logging_dir", "debug", "deepspeed", "fsdp", "fsdp_config",
           "fsdp_version", "special_tokens_check", "evals_per_epoch", "saves_per_epoch", "auto_resume_from_checkpoints",
           "plugins", "liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_layer_norm",
           "liger_fused_linear_cross_entropy", "cut_cross_entropy", "unsloth_lora_mlp", "unsloth_lora_qkv",
           "unsloth_lora_o", "torch_compile", "eval_sample_packing", "sample_packing_eff_est", "total_num_tokens",
           "use_tensorboard", "lora_model_dir", "lora_fan_in_fan_out", "eval_max_new_tokens", "eval_table_size"}
IGNORED_WHY = "nanotune picks its own kernels, attention, optimizer (AdamW) and logging"
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", None: "cosine"}
TEMPLATES = {"tokenizer_default": None, "chatml": "chatml", "llama3": "llama3", "gemma": "gemma", "phi_3": "phi3"}
TYPES = {"chat_template": "messages", "alpaca": "alpaca", "completion": "completion", "input_output": "segments",
         "sharegpt": "sharegpt"}
RL = ("dpo", "ipo", "orpo", "kto", "simpo")


def is_axolotl(y: dict) -> bool:
    return "model" not in y and any(k in y for k in MARKERS)


def migrate(y: dict, path: str, rl_script=False):
    """cli.read_yaml's hook: an Axolotl mapping -> (nanotune's mapping, notes); None for any other file."""
    return from_axolotl(y, path, rl_script) if is_axolotl(y) else None


def refuse(path, key, value, fix):
    raise NanotuneError(f"{path}: Axolotl's {key}: {value!r} is not supported by nanotune; {fix}.")


def dataset(d, path, roles: list, rl_script=False, notes=None) -> dict:
    """One entry of Axolotl's `datasets` -> nanotune's {path, type}; its roles_to_train gathered into `roles`.
    rl_script: a preference file (Axolotl's type names its field layout; dpo.py detects its own formats)."""
    if isinstance(d, str):
        return {"path": d}
    if rl_script:
        if "type" in d:
            notes.append(f"{path}: Axolotl's datasets type {d['type']!r} is ignored (dpo.py reads prompt / chosen / "
                         "rejected and conversation pairs by their fields).")
        return {"path": d.get("path") or d.get("data_files")}
    kind = d.get("type", "chat_template")
    if isinstance(kind, dict) or kind not in TYPES:
        refuse(path, "datasets type", kind, f"use one of {', '.join(TYPES)} (or convert the file to messages JSONL)")
    field = d.get("field_messages", "messages" if kind == "chat_template" else None)
    if kind == "chat_template" and field not in ("messages", "conversations"):
        refuse(path, "datasets field_messages", field, "rename the field to messages in the file")
    maps = d.get("message_property_mappings") or {}
    if any(maps.get(k, k) != k for k in ("role", "content")) and field != "conversations":
        refuse(path, "datasets message_property_mappings", maps, "rename the fields to role / content in the file")
    if d.get("train_on_eos", "turn") != "turn":
        refuse(path, "datasets train_on_eos", d["train_on_eos"],
               "nanotune trains the end marker of every trained turn (Axolotl's 'turn')")
    extra = sorted(set(d) - {"path", "type", "field_messages", "message_property_mappings", "roles_to_train",
                             "train_on_eos", "split", "ds_type", "data_files"})
    if extra:
        refuse(path, "datasets key", extra[0], "nanotune reads path, type, field_messages, roles_to_train, "
                                               "train_on_eos")
    if "roles_to_train" in d:
        roles.append(list(d["roles_to_train"]))
    fmt = "sharegpt" if field == "conversations" else TYPES[kind]
    return {"path": d.get("path") or d.get("data_files"), "type": fmt}


def from_axolotl(y: dict, path: str, rl_script=False) -> tuple:
    """An Axolotl config mapping -> ({nanotune field: value}, [one line per key ignored]). rl_script: for dpo.py."""
    out, notes, roles = {}, [], []
    for k, v in y.items():
        if v is None or (k in ("s2_attention", "lora_fan_in_fan_out") and v is False):
            continue  # (unset in Axolotl too)
        if k in SAME:
            out[SAME[k]] = v
        elif k in IGNORED:
            notes.append(f"{path}: Axolotl's {k} is ignored ({IGNORED_WHY}).")
        elif k == "datasets":
            out["datasets"] = [dataset(d, path, roles, rl_script, notes) for d in v]
        elif k == "adapter":
            if v not in ("lora", "qlora", None):
                refuse(path, k, v, "use lora or qlora, or leave adapter out for full fine-tuning")
            out["lora"] = v is not None
            out["load_in_4bit"] = v == "qlora" or y.get("load_in_4bit", False)
        elif k == "lora_target_linear":
            if v and "lora_target_modules" not in y:
                out["lora_targets"] = list(DEFAULT_TARGETS)  # (train.py adds the mixers' own projections)
        elif k == "lr_scheduler":
            if v not in SCHEDULES:
                refuse(path, k, v, "nanotune schedules cosine, linear or constant after warmup")
            out["schedule"] = SCHEDULES[v]
        elif k == "chat_template":
            if v not in TEMPLATES and v != "jinja":
                refuse(path, k, v, f"use one of {', '.join(TEMPLATES)} or jinja with chat_template_jinja")
            out["chat_template"] = y.get("chat_template_jinja") if v == "jinja" else TEMPLATES[v]
        elif k == "chat_template_jinja":
            continue
        elif k in ("bf16", "fp16"):
            if v is True or (v == "auto" and k == "bf16"):
                out["dtype"] = "bfloat16" if k == "bf16" else "float16"
            elif v not in (False, None, "auto"):
                refuse(path, k, v, "use true, false or auto")
        elif k == "rl":
            if v not in RL or not rl_script:
                refuse(path, k, v, "preference training runs in dpo.py (python dpo.py --config ...)" if v in RL
                       else f"dpo.py runs {', '.join(RL)}")
            out["loss"] = v
            out.setdefault("rpo_alpha", 0.0)  # (Axolotl adds no NLL term unless rpo_alpha is set)
        elif k == "optimizer":
            if not str(v).startswith(("adamw", "paged_adamw")):
                refuse(path, k, v, "nanotune trains with AdamW (leave optimizer out, or use adamw_torch)")
            notes.append(f"{path}: Axolotl's optimizer {v} runs as nanotune's AdamW (full-precision state).")
        elif k == "special_tokens":
            if set(v) - {"pad_token"}:
                refuse(path, k, v, "add the tokens to the tokenizer (and resize the model) first; nanotune trains "
                                   "the vocabulary it loads")
            notes.append(f"{path}: Axolotl's special_tokens pad_token is ignored (padding never takes loss).")
        elif k == "resume_from_checkpoint":
            out["resume"] = v
        elif k == "load_in_8bit":
            if v:
                refuse(path, k, v, "use load_in_4bit (QLoRA) or a 16-bit base")
        else:
            refuse(path, k, v, "remove it, or set what it does with nanotune's own key (train.py --help)")
    if roles:
        if any(r != roles[0] for r in roles):
            refuse(path, "datasets roles_to_train", roles, "nanotune trains one set of roles for every dataset")
        out["roles_to_train"] = roles[0]
    return out, notes
