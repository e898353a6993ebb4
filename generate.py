"""Try a model: one answer, a completion, or an interactive chat.

    python generate.py --prompt "What is the capital of France?"      # default model, SmolLM2-135M-Instruct
    python generate.py --model path/to/hf_dir --chat                 # interactive; empty line or Ctrl-D quits
    python generate.py --adapter out/adapter --prompt "Who are you?"  # the default model + a trained adapter
    python generate.py --model model.gguf --raw --prompt "Once upon a time"   # plain completion, no template
"""
import argparse
import math
import re

import torch

from cli import NanotuneError, Parser, cli
from names import adapter_names
from formats import load
from lora import load_adapter
from model import generate


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF directory, .gguf file, or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (nanotune or PEFT) to apply")
    p.add_argument("--prompt", default="What is the capital of France?",
                   help="the user message (or raw text with --raw)")
    p.add_argument("--system", default=None, help="system message for chat templates")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
    p.add_argument("--raw", action="store_true", help="complete the prompt as plain text, no chat template")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    a = p.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", a.device):
        raise NanotuneError(f"--device {a.device!r} is not one nanotune runs on; use cpu, cuda or cuda:N.")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise NanotuneError(f"--device {a.device}: this machine has no CUDA device; use --device cpu.")
    for flag, ok, legal in (("max_new_tokens", 1 <= a.max_new_tokens <= 1 << 20, "in [1, 1048576]"),
                            ("top_k", a.top_k >= 0, ">= 0"), ("temperature", 0 <= a.temperature < math.inf, ">= 0"),
                            ("top_p", 0 < a.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise NanotuneError(f"--{flag} {getattr(a, flag)} is out of range; use a value {legal}.")
    if a.raw and not a.prompt:
        raise NanotuneError("--raw needs a --prompt to continue; it is empty.")
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    model, tok = load(a.model, dtype=dtype, device=a.device)
    if a.adapter:
        load_adapter(model, a.adapter, **adapter_names(model.config, saving=False))
    context = model.config.max_position_embeddings
    if a.max_new_tokens > context:  # (the KV cache holds prompt + answer: 1e9 tokens would be gigabytes)
        raise NanotuneError(f"--max_new_tokens {a.max_new_tokens} is more than this model's context ({context} "
                            "tokens); ask for fewer.")
    sample = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  seed=a.seed, stop_ids=tok.stop_ids, graphs=None)  # (on CUDA: the decode step as CUDA graphs)

    def reply(ids):
        out = generate(model, ids, **sample)
        return tok.decode(out).strip()

    messages = [{"role": "system", "content": a.system}] if a.system else []
    if a.raw:
        print(a.prompt + tok.decode(generate(model, tok.encode(a.prompt), **sample)))
    elif not a.chat:
        print(reply(tok.chat(messages + [{"role": "user", "content": a.prompt}])))
    else:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                break
            messages.append({"role": "user", "content": line})
            answer = reply(tok.chat(messages))
            messages.append({"role": "assistant", "content": answer})
            print(answer, flush=True)


if __name__ == "__main__":
    cli(main)
