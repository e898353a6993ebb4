"""nanotune bench: training tokens/s and peak memory, nanotune beside its peers, each in its own process
on the same GPU with the same random-init checkpoint, shape and batch.

    python bench.py --shape 8b --mode lora --batch 4 --seq 2048          # all contenders that import
    python bench.py --shape 1b --mode qlora --contenders nanotune,unsloth
    python bench.py --kernels                                          # each kernel vs reference vs compile
    python bench.py --shape 8b --mode qlora --batch 1 --seq 65536 --max_context 80 --contenders nanotune-long,unsloth
    python bench.py --cpu                        # the default job's step on a CPU: nanotune vs HF + PEFT
    python bench.py --shape 8b --mode full --contenders nanotune --fsdp --nproc 2  # torchrun + FSDP2, per GPU
    python bench.py --shape 70b --mode qlora --contenders nanotune --fsdp --nproc 2 --steps 3 --warmup 1

Contenders: nanotune, hf_peft (transformers + PEFT, SDPA), hf_peft_liger (+ Liger kernels), hf_bnb_qlora (transformers
+ bitsandbytes + PEFT; --mode qlora), unsloth; peers that do not import are skipped (../shared/tools/bench_wheels.sh
prepares them). Median step time after warm-up, tokens/s, model-FLOPs utilisation (vs the GPU's dense bf16 peak) and
torch.cuda.max_memory_allocated over loading + training: a table on stdout, JSON in --json (results/bench.json).
--cpu: the default model itself (SmolLM2-135M-Instruct, fp32), LoRA r16 on all seven projections, batch 4 x 256,
AdamW, no checkpointing; contenders alternate for --rounds rounds; peak = the process's max RSS.
--rollout N: a GRPO step's sampling (N tokens per row) and, for nanotune, its update (grpo.policy_update)."""
import argparse
import collections
import json
import os
from resource import RUSAGE_SELF, getrusage
import statistics
import subprocess
import sys
import time

import torch

from bench_long import LONG_TILE, TIMED_OUT, long_settings, longest_context, meta_model, planned_longest
from cli import publish

SHAPES = {  # Llama-3.1-8B, Llama-3.2-1B and SmolLM2-135M (the default model); tiny for a smoke run
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),  # Llama-3.1-70B
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
    # Qwen3-30B-A3B with 8 of its 48 layers (the same for every contender: the full bf16 checkpoint outgrows the disk)
    "qwen3moe": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=8,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151_936,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                     rope_theta=1e6, rms_norm_eps=1e-6),
    # gpt-oss-20b with 12 of its 24 layers (its bf16 checkpoint, 42 GB, would crowd the GPU machine's disk): 32
    # experts top-4 with biases, sinks, 128-token sliding / full layers, YaRN x32; the rest from the family
    "gptoss": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, moe_intermediate_size=2880,
                   num_hidden_layers=12, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                   vocab_size=201_088, num_local_experts=32, num_experts=32, num_experts_per_tok=4),
    # Gemma-3-4B (text): 5 sliding (1024) : 1 global layers, head_dim 256, 262k vocab; the rest from the family
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262_208,
                      sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # Gemma-4-E4B-like (text): per-layer inputs (256 per layer), the last 18 layers reuse k/v, 5 sliding (512) : 1
    # full layers (head_dim 512 there, proportional RoPE), softcapping; the rest from the family
    "gemma4-e4b": dict(model_type="gemma4_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
                       hidden_size_per_layer_input=256, vocab_size=262_144, vocab_size_per_layer_input=262_144,
                       num_kv_shared_layers=18, sliding_window=512, final_logit_softcapping=30.0,
                       layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7),
    # Qwen3.5-4B-like (text): 3 Gated DeltaNet (16 key / 32 value heads of 128) : 1 gated attention layers, 248k vocab
    "qwen35-4b": dict(model_type="qwen3_5_text", hidden_size=2560, intermediate_size=9216, num_hidden_layers=32,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=256, vocab_size=248_320,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}),
    # Qwen3.5-35B-A3B, 8 of its 40 layers (7.7B parameters): 3 : 1 mix, 256 experts (512) top-8, a shared one of 512
    "qwen35moe": dict(model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=2, head_dim=256, num_experts=256, num_experts_per_tok=8,
                      moe_intermediate_size=512, shared_expert_intermediate_size=512, vocab_size=248_320,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}),
}
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
APPLIES = {"lora": ("nanotune", "hf_peft", "hf_peft_liger", "unsloth"),
           "qlora": ("nanotune", "hf_bnb_qlora", "unsloth"),
           "full": ("nanotune", "hf_peft", "unsloth")}  # hf_peft in full mode is plain transformers
IN_PLACE = {"70b"}  # no checkpoint (141 GB of bf16 outgrows the disk): nanotune --fsdp, random init on the GPUs
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (vendor spec)


def shape_config(shape):
    """A shape as the config.json its checkpoint would carry, read the way every checkpoint is."""
    from families import config_from_hf
    s = SHAPES[shape]
    llama = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=ROPE,
                 max_position_embeddings=131072)
    return config_from_hf({**(llama if "model_type" not in s else {}), "bos_token_id": 1, "eos_token_id": 2, **s})


def make_checkpoint(shape, path):
    """One random-init checkpoint (HF layout, bf16) that every contender loads: N(0, 0.02) matrices, norm weights 1."""
    from formats import save_hf
    from model import Transformer
    if os.path.isfile(os.path.join(path, "config.json")):
        return save_bench_tokenizer(path)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        m = Transformer(shape_config(shape)).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:  # (stacked experts are 3-D)
                p.normal_(0, 0.02)
    save_hf(m, path)
    save_bench_tokenizer(path)
    del m
    torch.cuda.empty_cache()  # (this process stays alive while the contenders run: its cached blocks would crowd them)


def random_tensors(cfg, device):
    """The same kind of init as make_checkpoint, made tensor by tensor on the GPU (seeded, so every rank
    makes the same weights) for shapes whose checkpoint would not fit the disk."""
    from model import Transformer
    with torch.device("meta"):
        names = [(n, p.shape) for n, p in Transformer(cfg).named_parameters()]
    g = torch.Generator(device).manual_seed(0)
    for n, shape in names:
        t = torch.empty(shape, device=device, dtype=torch.bfloat16)
        yield n, (t.normal_(0, 0.02, generator=g) if len(shape) == 2 else t.fill_(1.0))


def save_bench_tokenizer(path):
    """Peers load a tokenizer with the weights (the ids are random anyway): a byte-level BPE with no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return
    alphabet = ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(["<s>", "</s>", *sorted(alphabet)])}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "</s>", "model_max_length": 131072}, f)


def model_flops_per_token(cfg, mode, seq):
    """Matmul FLOPs per trained token: forward 2N, input-gradient 2N, weight-gradient 2N (full only);
    attention 6 L s d (causal, forward + backward). Recomputation is not counted (model FLOPs)."""
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = d * cfg["num_attention_heads"], d * cfg["num_key_value_heads"]
    inter = cfg["num_experts_per_tok"] * cfg["moe_intermediate_size"] if cfg.get("num_experts") else cfg[
        "intermediate_size"]  # (MoE: the k experts a token takes)
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * inter
    n = L * per_layer + h * cfg["vocab_size"]
    return (6 if mode == "full" else 4) * n + 6 * L * seq * q


# ---------------------------------------------------------------------------------------------
# Workers: one contender, one process
def load_contender(name, ckpt, mode, seq, fsdp=False, shape=None, doc_len=0, cpu=False, cap=0):
    """-> (model, step_fn(ids) -> loss tensor); ckpt None: random init in place (IN_PLACE shapes)"""
    if name.startswith("nanotune"):  # variants: -nooffload (block inputs stay on the GPU), -ref (PyTorch
        import kernels                # references instead of the kernels), -flash (no cuDNN attention),
        import lora                   # -varlen (packed rows through varlen flash attention, not a mask),
        import memory                 # -graph (forward + backward replayed as one CUDA graph), -fp8 (an FP8
        import quant                  # base, --base_dtype float8), -long (MLP tiles, host-bounded offload)
        import train
        from formats import load_model
        kernels.set_fused("-ref" not in name)
        kernels.FP8_FAST_ACCUM = "-fp8fast" in name  # (-fp8fast: -fp8 whose forward GEMM accumulates fast)
        if cpu:
            memory.keep_freed_memory()  # as train.py does on a CPU
        if "-flash" in name:  # SDPA without its cuDNN backend (flash attention instead)
            torch.backends.cuda.enable_cudnn_sdp(False)
        if fsdp:  # as train.py under torchrun: LoRA + sharding on the meta model, each rank loads its shards
            m = nanotune_fsdp(ckpt, mode, shape, offload="-nooffload" not in name)
        else:
            q4 = quant.prepare_4bit if mode == "qlora" else quant.prepare_fp8 if "-fp8" in name else None
            m = load_model(ckpt, dtype=torch.float32 if cpu else torch.bfloat16, device="cpu" if cpu else "cuda",
                           prepare=q4)
            if mode != "full":
                lora.apply_lora(m, r=16, alpha=16, dropout=0.0)
        keep, every = long_settings(m, seq, cap) if "-long" in name else (0, 1)
        memory.checkpoint_blocks(m, not cpu, "-nooffload" not in name and not cpu, keep, every)
        memory.tile_mlp(m, LONG_TILE if "-long" in name else 0)  # (-long: MLP tiles, host memory within 100 GiB)
        m.varlen = "-varlen" in name
        m.train()

        def batch(ids):
            b = {"input_ids": ids, "labels": ids}
            if doc_len:  # packed rows: documents of doc_len tokens, positions restart at each
                b["position_ids"] = (torch.arange(ids.shape[1], device=ids.device) % doc_len).expand_as(ids)
            return b

        def n(ids):  # trained tokens: every position but each row's last
            return ids.numel() - ids.shape[0]

        def loss(ids):  # mean over the trained tokens
            return m.run(train.token_loss_sum, batch(ids)) / n(ids)
        if "-graph" in name:  # forward + backward replayed as a CUDA graph (train.py --cuda_graphs)
            graph = train.graphed_loss(m)
            loss.fwd_bwd = lambda ids: graph(batch(ids), 1 / n(ids)) / n(ids)
        return m, loss
    here = os.path.dirname(os.path.abspath(__file__))  # a peer's process imports nothing of nanotune: off the path,
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # so transformers >= 5.25 finds the
    import transformers                                                          # Hugging Face `kernels` package
    kw = dict(dtype=torch.float32 if cpu else torch.bfloat16,  # (gpt-oss's sinks: transformers' eager attention)
              attn_implementation="eager" if SHAPES[shape].get("model_type") == "gpt_oss" else "sdpa",
              device_map="cpu" if cpu else "cuda")
    if name == "hf_peft_liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    if name == "unsloth":
        from unsloth import FastLanguageModel
        m, _ = FastLanguageModel.from_pretrained(ckpt, max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=mode == "qlora", full_finetuning=mode == "full")
        if mode != "full":
            m = FastLanguageModel.get_peft_model(m, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                                 use_gradient_checkpointing="unsloth")
    else:
        if mode == "qlora":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
        m = transformers.AutoModelForCausalLM.from_pretrained(ckpt, **kw)
        if not cpu:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode != "full":
            from peft import LoraConfig, get_peft_model
            if mode == "qlora":
                from peft import prepare_model_for_kbit_training
                m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
            # MoE: the experts' stacked weights as target_parameters, rank r as Unsloth and nanotune adapt them
            # (given gate/up/down_proj as target_modules, peft 0.21 adapts them itself but gate_up_proj at rank 2r)
            moe = SHAPES[shape].get("num_experts")
            experts = dict(target_modules=TARGETS[:4], target_parameters=["mlp.experts.gate_up_proj",
                                                                          "mlp.experts.down_proj"])
            m = get_peft_model(m, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             **(experts if moe else dict(target_modules=TARGETS))))
    m.train()

    def loss(ids):
        return m(input_ids=ids, labels=ids).loss
    return m, loss


def nanotune_fsdp(ckpt, mode, shape, offload):
    import build
    import lora
    import train
    from formats import load_tensors
    from model import Transformer
    tc = train.TrainConfig(model=ckpt, lora=mode != "full", load_in_4bit=mode == "qlora", lora_alpha=16.0,
                           lora_targets=TARGETS, gradient_checkpointing=True, offload_activations=offload)
    dev = torch.device("cuda", torch.cuda.current_device())
    if ckpt is not None:
        return build.build_model(tc, dev, torch.bfloat16)
    with torch.device("meta"):
        m = Transformer(shape_config(shape))
    build.shard_on_meta(m, tc, dev, torch.bfloat16)
    load_tensors(m, random_tensors(m.config, dev), torch.bfloat16, dev, f"random {shape}")
    lora.init_lora(m, 0)
    return m


def worker(a):
    dev = "cpu" if a.cpu else "cuda"
    sync = torch.cuda.synchronize if not a.cpu else (lambda: None)
    if not a.cpu:
        torch.cuda.reset_peak_memory_stats()
    if a.cap:  # --max_context: this process may allocate at most cap GiB
        torch.cuda.set_per_process_memory_fraction(a.cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    if a.memory:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    if a.fsdp:
        import dist
        dist.init()
    ckpt = None if a.ckpt == "none" else a.ckpt
    t_load = time.perf_counter()
    m, loss_fn = load_contender(a.worker, ckpt, a.mode, a.seq, a.fsdp, a.shape, a.doc_len, a.cpu, a.cap)
    print(f"loaded in {time.perf_counter() - t_load:.0f} s", file=sys.stderr, flush=True)  # (shown if it times out)
    if a.rollout:
        return rollout_worker(a, m.eval(), dev, sync)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=not a.cpu)
    fwd_bwd = getattr(loss_fn, "fwd_bwd", None)  # runs backward itself (-graph)
    g = torch.Generator(device=dev).manual_seed(0)
    vocab = SHAPES[a.shape]["vocab_size"]
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq), device=dev, generator=g)
        sync()
        t0 = time.perf_counter()
        if fwd_bwd:
            loss = fwd_bwd(ids)
        else:
            loss = loss_fn(ids)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=fwd_bwd is None)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"step {i + 1} of {a.warmup + a.steps}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    step = statistics.median(times)
    if a.profile:  # one more step under the profiler: the GPU time per kernel, largest first
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fwd_bwd(ids) if fwd_bwd else loss_fn(ids).backward()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events  # kernels and copies (both streams), as the table sums
                  if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1e3
        with open(a.profile, "w") as f:
            f.write(f"forward+backward under the profiler: {wall * 1e3:.1f} ms wall, {gpu:.1f} ms of GPU work "
                    f"(median step without the profiler, optimizer included: {step * 1e3:.1f} ms)\n")
            for key in ("self_cuda_time_total", "self_cpu_time_total"):
                f.write(events.table(sort_by=key, row_limit=30, max_name_column_width=70) + "\n")
    if a.memory:
        with open(a.memory, "w") as f:
            f.write(memory_at_peak(torch.cuda.memory._snapshot()))
    print("RESULT " + json.dumps({"contender": a.worker, "step_s": step, "tokens_per_s": a.batch * a.seq / step,
                                  "peak_gib": peak_gib(a.cpu), "host_gib": peak_gib(True), "loss_first": losses[0],
                                  "loss_last": losses[-1], "trainable": sum(p.numel() for p in params)}), flush=True)


@torch.no_grad()
def rollout_worker(a, m, dev, sync):
    """--rollout N: a GRPO step's sampling, `batch` rows of `seq` random prompt tokens each continued by exactly N
    sampled tokens (no stop), after a 4-token warm-up: nanotune's grpo.rollout (KV cache; on CUDA its decode step
    replayed as CUDA graphs, nanotune-eager without; nanotune-dense: the 4-bit base dequantized once per rollout) or
    transformers' generate, the same checkpoint with LoRA on (NF4 base for qlora)."""
    ids = torch.randint(0, SHAPES[a.shape]["vocab_size"], (a.batch, a.seq), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(0))
    if a.worker.startswith("nanotune"):
        import grpo  # (a peer's process has the repository off its path)
    elif a.worker == "unsloth":  # (its own fast generation path)
        __import__("unsloth").FastLanguageModel.for_inference(m)
    def timed(fn):  # -> (fn(), its seconds)
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0
    times, how = [], {}  # (how: nanotune's choices, CUDA graphs and a dequantized base)
    for n in (4, a.rollout):
        out, t = timed(lambda: grpo.rollout(m, ids.tolist(), n, set(), 0, seeds=range(a.batch), graphs=False if (
            "-eager" in a.worker) else None, dense="-dense" in a.worker, info=how) if a.worker.startswith(
            "nanotune") else m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                        max_new_tokens=n, min_new_tokens=n, pad_token_id=0)[:, a.seq:].tolist())
        times.append(t)
    assert all(len(r) == a.rollout for r in out)
    res = {"contender": a.worker, "step_s": times[-1], "tokens_per_s": a.batch * a.rollout / times[-1],
           "new_tokens": a.rollout, "warmup_s": times[0], "rollout_peak_gib": peak_gib(a.cpu), **how}
    if a.worker.startswith("nanotune"):  # then the GRPO step's update on these rows: the whole step's peak
        rows = torch.cat([ids, torch.tensor(out, device=dev)], 1)
        adv = torch.randn(a.batch, device=dev, generator=torch.Generator(dev).manual_seed(0))  # (random rewards)
        _, res["update_s"] = timed(lambda: grpo.policy_update(m.train(), rows, a.seq, adv, a.micro))
    print("RESULT " + json.dumps(dict(res, peak_gib=peak_gib(a.cpu), loss_first=0.0, loss_last=0.0)), flush=True)


# ---------------------------------------------------------------------------------------------
def peak_gib(cpu):
    """GPU: the allocator's peak; CPU: the process's peak resident memory (ru_maxrss is KiB on Linux)."""
    return getrusage(RUSAGE_SELF).ru_maxrss / 2**20 if cpu else torch.cuda.max_memory_allocated() / 2**30


def memory_at_peak(snap, top=40):
    """Replays the allocator's history to the moment the most was allocated and sums what was alive then by the
    innermost line of this repository's code (or of any code, outside it) that allocated it."""
    here = os.path.dirname(os.path.abspath(__file__))
    events = [e for e in snap["device_traces"][torch.cuda.current_device()]
              if e["action"] in ("alloc", "free_requested")]
    cur = peak = at = 0
    for i, e in enumerate(events):
        cur += e["size"] if e["action"] == "alloc" else -e["size"]
        if cur > peak:
            peak, at = cur, i
    live = {}
    for e in events[:at + 1]:
        live[e["addr"]] = e if e["action"] == "alloc" else live.pop(e["addr"], None)
    live = {k: e for k, e in live.items() if e is not None}

    def where(e):
        frames = e.get("frames") or []
        ours = [f for f in frames if f["filename"].startswith(here)] or frames[:1]
        return ", ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in ours[:3]) or "?"
    by = collections.defaultdict(lambda: (0, 0))
    for e in live.values():
        by[where(e)] = (by[where(e)][0] + 1, by[where(e)][1] + e["size"])
    lines = [f"peak {peak / 2**30:.2f} GiB allocated (history event {at} of {len(events)}; "
             f"events before the history's start are not counted), {len(live)} blocks alive:"]
    for k, (n, b) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{b / 2**30:8.3f} GiB {n:6d} blocks  {k}")
    return "\n".join(lines) + "\n"


def versions():
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "unsloth"):
        try:  # installed metadata, no import (importing unsloth patches the process)
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8b", choices=list(SHAPES))
    p.add_argument("--mode", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="default 2048 (256 with --cpu)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--contenders", default="nanotune,hf_peft,hf_peft_liger,hf_bnb_qlora,unsloth")
    p.add_argument("--ckpt_dir", default="/tmp/nanotune-bench")
    p.add_argument("--json", default="results/bench.json", help="append this run's rows to the file")
    p.add_argument("--device_call", default=None, help="tag every row with the device call that measured it (s9-1)")
    p.add_argument("--doc_len", type=int, default=0, help="nanotune: packed rows of documents this long (0: none)")
    p.add_argument("--fsdp", action="store_true", help="nanotune under torchrun + FSDP2")
    p.add_argument("--nproc", type=int, default=1, help="--fsdp: GPUs (processes); tokens/s is per GPU")
    p.add_argument("--kernels", action="store_true")
    p.add_argument("--worker_timeout", type=int, default=400, help="seconds before a contender is skipped")
    p.add_argument("--profile", help="each contender's per-kernel GPU times of one step -> PROFILE.<name>...txt")
    p.add_argument("--memory", help="what is allocated at each contender's peak, by line -> MEMORY.<name>...txt")
    p.add_argument("--rollout", type=int, default=0, help="N > 0: GRPO rollout speed, N new tokens per row")
    p.add_argument("--micro", type=int, default=8, help="--rollout: rows per micro-batch of the GRPO update after it")
    p.add_argument("--cpu", action="store_true", help="the default job on this CPU (see above)")
    p.add_argument("--rounds", type=int, default=2, help="--cpu: contenders alternate this many times")
    p.add_argument("--max_context", type=float, default=0, help="CAP_GIB: each contender's longest sequence (batch "
                   "1) that trains within CAP GiB and its tokens/s there: nanotune-long's from its plan, the "
                   "others' searched from --seq (bench_long.py)")
    p.add_argument("--cap", type=float, default=0, help="CAP_GIB: one run at --seq within CAP GiB")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.seq = a.seq or (256 if a.cpu else 2048)
    if a.max_context and a.batch != 1:
        p.error("--max_context searches one sequence a step: pass --batch 1")
    if a.worker:
        return worker(a)
    if a.cpu:
        return bench_cpu(a)
    if not torch.cuda.is_available():
        sys.exit("bench.py measures on a CUDA GPU and none is visible here; run it on a GPU machine "
                 "(the tests in tests/ are the CPU check).")
    gpu = torch.cuda.get_device_name()
    if a.kernels:
        from bench_kernels import bench_kernels
        rows = bench_kernels()
        return save(a.json, gpu, [{"kernels": rows}], a.device_call)
    if a.shape in IN_PLACE and (not a.fsdp or a.contenders != "nanotune"):
        p.error(f"--shape {a.shape} runs only as --contenders nanotune --fsdp (it is initialised on the GPUs)")
    ckpt = "none" if a.shape in IN_PLACE else os.path.join(a.ckpt_dir, a.shape)
    if a.shape not in IN_PLACE:
        make_checkpoint(a.shape, ckpt)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    fpt = model_flops_per_token(SHAPES[a.shape], a.mode, a.seq)
    rows, cap = [], a.max_context or a.cap  # (--cap: one length within the cap, as a --max_context probe)
    for c in a.contenders.split(","):
        if c not in APPLIES[a.mode] and not c.startswith("nanotune"):
            continue
        cmd = [sys.executable, __file__, "--worker", c, "--ckpt", ckpt, "--shape", a.shape, "--mode", a.mode,
               "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--doc_len", str(a.doc_len), "--rollout", str(a.rollout), "--micro", str(a.micro)]
        if a.profile:
            cmd += ["--profile", f"{a.profile}.{c}.{a.shape}.{a.mode}.txt"]
        if a.memory:
            cmd += ["--memory", f"{a.memory}.{c}.{a.shape}.{a.mode}.txt"]
        if a.fsdp and c.startswith("nanotune"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
                   *cmd[1:], "--fsdp"]
        t0, cmd = time.time(), cmd + (["--cap", str(cap)] if cap else [])
        if a.max_context:  # the longest sequence that trains within the cap (batch 1), its tokens/s there
            plan = planned_longest(meta_model(shape_config(a.shape), a.mode), cap) if "-long" in c else 0
            seq, res = longest_context(lambda n: run_worker(cmd, n, a, c), plan or a.seq, planned=bool(plan))
            res = res and dict(res, max_context=seq, **({"planned": plan} if plan else {}))  # (nanotune-long: its plan)
        else:
            res = run_worker(cmd, a.seq, a, c)
        res = dict(res, cap_gib=cap) if cap and isinstance(res, dict) else res
        if res is None or res is TIMED_OUT:
            continue
        mfu = res["tokens_per_s"] * fpt / peak if peak and not a.rollout and not a.max_context else None
        res.update(shape=a.shape, mode=a.mode + ("+rollout" if a.rollout else "") +
                   (f"+fsdp{a.nproc}" if a.fsdp and c.startswith("nanotune") else "") +
                   (f"+docs{a.doc_len}" if a.doc_len and c.startswith("nanotune") else ""), batch=a.batch,
                   seq=res.get("max_context", a.seq), mfu=mfu, wall_s=round(time.time() - t0))
        if a.memory:  # (the allocator's history slows the steps: the peak counts, the speed does not)
            res["memory_history"] = True
        rows.append(res)
        save(a.json, gpu, [res], a.device_call)  # row by row: a run cut short keeps what it measured
        print(f"{c:14s} {res['tokens_per_s']:9,.0f} tok/s  {res['peak_gib']:6.2f} GiB  MFU {res['mfu'] or 0:.1%}  "
              f"loss {res['loss_first']:.3f}->{res['loss_last']:.3f}", flush=True)
    base = {r["contender"]: r["tokens_per_s"] for r in rows}
    for r in rows:  # printed only: the rows were saved as measured, and each ratio follows from them
        for peer in ("hf_peft", "hf_bnb_qlora", "unsloth"):
            if peer in base and r["contender"] != peer:
                print(f"{r['contender']} / {peer}: {r['tokens_per_s'] / base[peer]:.2f}x", flush=True)


def bench_cpu(a):
    """The default job's step on this CPU, nanotune vs transformers + PEFT, alternating (see the docstring)."""
    import platform
    from formats import load_model, save_hf
    ckpt = os.path.join(a.ckpt_dir, "smollm2-135m-fp32")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):  # the default model's GGUF, as an HF dir for peers
        save_hf(load_model(None, dtype=torch.float32), ckpt, dtype=torch.float32)
    where = (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch threads {torch.get_num_threads()}")
    runs = {}
    for rnd in range(a.rounds):
        for c in ("nanotune", "hf_peft"):
            cmd = [sys.executable, __file__, "--worker", c, "--ckpt", ckpt, "--shape", "135m", "--mode", "lora",
                   "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup",
                   str(a.warmup), "--cpu"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{c}: skipped ({(r.stderr.strip().splitlines() or ['no output'])[-1][:300]})", flush=True)
                continue
            res = json.loads(line[7:])
            print(f"round {rnd + 1} {c:9s} {res['step_s']:6.2f} s/step  {res['tokens_per_s']:6.1f} tok/s  "
                  f"peak RSS {res['peak_gib']:.2f} GiB  loss {res['loss_first']:.4f}->{res['loss_last']:.4f}",
                  flush=True)
            runs.setdefault(c, []).append(res)
    rows = []
    for c, rs in runs.items():
        row = dict(rs[0], step_s=statistics.median(r["step_s"] for r in rs), rounds=[r["step_s"] for r in rs],
                   peak_gib=max(r["peak_gib"] for r in rs), shape="135m-default", mode="lora-fp32-cpu", batch=a.batch,
                   seq=a.seq, device=where, date=time.strftime("%Y-%m-%d"), command="python bench.py --cpu")
        row["tokens_per_s"] = a.batch * a.seq / row["step_s"]
        rows.append(row)
    if len(runs) == 2:
        rows[0]["vs_hf_peft"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        print(f"nanotune / hf_peft: {rows[0]['vs_hf_peft']:.2f}x (median s/step over {a.rounds} rounds)", flush=True)
    # CPU rows go to their own file: results/bench.json is the GPU's (each row's "gpu" names its device)
    save(a.json if a.json != "results/bench.json" else "results/bench_cpu.json", where, rows, a.device_call)


def run_worker(cmd, seq, a, c):
    """One contender's worker at `seq` tokens a row -> its RESULT, None (out of memory, an error) or TIMED_OUT."""
    cmd = [*cmd[: cmd.index("--seq") + 1], str(seq), *cmd[cmd.index("--seq") + 2:]]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.worker_timeout)
    except subprocess.TimeoutExpired as e:  # where it stood: its last lines (load time, steps done)
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        tail = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln][-3:]
        print(f"{c} at {seq} tokens: skipped (over {a.worker_timeout} s; it printed: {' | '.join(tail) or 'nothing'})",
              flush=True)
        return TIMED_OUT
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        lines = r.stderr.strip().splitlines()
        err = (" | ".join(ln for ln in lines if "Error" in ln or "error" in ln)[-600:]
               or (lines or ["no output"])[-1][:300])
        print(f"{c} at {seq} tokens: skipped ({err})", flush=True)
        return None
    return json.loads(line[7:])


def save(path, gpu, rows, device_call=None):
    if not path:
        return
    rows = [dict(r, gpu=gpu, **({"device_call": device_call} if device_call else {})) for r in rows]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old = json.load(open(path)) if os.path.isfile(path) else {"rows": []}
    old.update(gpu=gpu, versions=versions())
    old["rows"] = old.get("rows", []) + rows
    with open(path + ".tmp", "w") as f:
        json.dump(old, f, indent=2)
    publish(path + ".tmp", path)


if __name__ == "__main__":
    main()
