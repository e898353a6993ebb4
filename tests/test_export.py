"""Export: merged HF directories read by transformers, GGUF files run by llama.cpp (llama-cpp-python),
adapters, Ollama Modelfiles, and clean failures."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ARCH_CONFIGS, EAGER, ROOT, families, make_hf_model, save_tiny_tokenizer, tiny_lora_model

import export
import lora
import formats
import tokenizer
from cli import NanotuneError

GGUF_ARCHS = {  # the tiny configs, adjusted only where llama.cpp has no way to express the HF variant
    "llama": {}, "llama-tied-linear": {}, "qwen2": {}, "qwen3": {}, "gemma": {},
    "gemma2": {"query_pre_attn_scalar": 16},  # llama.cpp scales by 1/sqrt(head_dim)
    "mistral": {"sliding_window": 4096},  # llama.cpp's llama arch has no sliding window
    "ministral": {"sliding_window": 4096},
    "phi3": {"sliding_window": 4096},  # llama.cpp's phi3 ignores the window (measured: logits split at position 6)
    # llama.cpp's gemma3 scales by 1/sqrt(head_dim) and loads no o_proj bias; its olmo2 loads no biases at all
    "gemma3": {"query_pre_attn_scalar": 16, "attention_bias": False}, "olmo2": {"attention_bias": False},
    "phi": {}, "granite": {}, "qwen2-yarn": {}, "phi3-longrope": {"sliding_window": 4096},
    "arcee": {"attention_bias": False, "mlp_bias": False},  # llama.cpp's arcee loads no biases
    "starcoder2": {"sliding_window": 4096},  # llama.cpp's starcoder2 has no sliding window
    # llama.cpp's olmo2 (Olmo 3 too) loads no biases, its seed_oss and ernie4_5 no MLP biases (ERNIE 4.5 has none)
    "olmo3": {"attention_bias": False}, "seed_oss": {"mlp_bias": False}, "ernie4_5": {"use_bias": False},
    "glm4": {}, "hunyuan_v1_dense": {}, "glm4_moe": {}, "granitemoe": {},
    "falcon": {}, "falcon-40b": {},
    "mpt": {"attn_config": {"clip_qkv": 0.3}},  # (llama.cpp's mpt scales by 1/sqrt(head_dim): no softmax_scale)
    "apertus": {"initializer_range": 0.1},  # (q8_0's rounding flipped 3 of 40 near-tied top-1s at 0.02)
    # llama.cpp's llama4 fixes the chunk (8192), the NoPE step (4), the temperature (8192, 0.1) and q/k norms
    "llama4_text": {"attention_chunk_size": 8192, "no_rope_layers": [1, 1, 1, 0], "floor_scale": 8192,
                    "attn_scale": 0.1},
    # llama.cpp's YaRN has no way to say Ministral 3's attention factor 1 (mscale = mscale_all_dim): plain RoPE here;
    # its mistral3 does not scale queries by position (export warns): not before 64 tokens here
    "ministral3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.5,
                                       "original_max_position_embeddings": 64}},
    # llama.cpp's ernie4_5-moe: sparse from the first sparse layer on, no biases (ERNIE 4.5 has none); a wider
    # init, so that q8_0's rounding does not flip the near-uniform tiny router's choices (top-1 0.875 at 0.02)
    "ernie4_5_moe": {"moe_layer_end_index": -1, "use_bias": False, "initializer_range": 0.1},
    # llama.cpp's command-r and cohere2: head_dim = hidden / heads, the head tied (as Cohere's are)
    "cohere": {"head_dim": 16, "tie_word_embeddings": True}, "cohere2": {"head_dim": 16, "tie_word_embeddings": True},
    # Gemma 4: a wider init, so that q8_0's rounding does not flip near-tied top-1s (0.825 at 0.02, 0.875 at 0.05;
    # at 0.1 f16 ends 0.023 off); llama.cpp's per-layer table spans the vocabulary
    "gemma4_text": {"initializer_range": 0.07},
    "gemma4_text-moe": {"vocab_size_per_layer_input": 128},
    "exaone4": {"sliding_window": None, "layer_types": ["full_attention"] * 2},  # (EXAONE 4.0-1.2B: no NoPE layers)
    "smollm3": {"num_hidden_layers": 4, "no_rope_layer_interval": 4, "use_sliding_window": False},  # (its NoPE step)
    # llama.cpp's MoE archs: Mixtral as `llama` with experts, qwen3moe (always renormalised), qwen2moe (never,
    # and every layer sparse: the tiny config's dense first layer goes)
    "mixtral": {}, "qwen3_moe": {}, "qwen2_moe": {"mlp_only_layers": []},
    "olmoe": {"num_key_value_heads": 4, "clip_qkv": None},  # (llama.cpp's olmoe: no GQA, as OLMoE has none; it
    #                                                         clamps q, k, v elsewhere: export refuses clip_qkv)
    # llama.cpp's gpt-oss fixes the SwiGLU limit at 7 and rounds YaRN's correction range (truncate=false is not
    # expressible; export warns): the tiny config without YaRN, at gpt-oss's own limit
    "gpt_oss": {"swiglu_limit": 7.0, "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
    # the token-mixer families (gguf_mixers.py); llama.cpp loads no conv / Mamba2 projection biases and never
    # clamps the time step, and its granitehybrid needs the Mamba2 width at 2 x hidden_size
    "lfm2": {"conv_bias": False}, "qwen3_5_text": {"linear_value_head_dim": 8},  # (llama.cpp's qwen35: dv = dk)
    "qwen3_5_moe_text": {"linear_value_head_dim": 8},
    "qwen3_next": {"linear_value_head_dim": 8, "mlp_only_layers": []},  # (llama.cpp's qwen3next: every layer MoE)
    "granitemoehybrid": {}, "granitemoehybrid-dense": {"mamba_proj_bias": False, "time_step_limit": (0.0,
                                                                                                  float("inf"))},
    "deepseek_v3": {}, "mistral4": {},  # (MLA; the second with YaRN and the query temperature past 8 tokens)
    # halves rotated (rope_interleave false), no q bottleneck, YaRN: llama.cpp scales by mscale_all_dim alone
    "deepseek_v3-yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 32,
                                             "beta_fast": 32, "beta_slow": 1}},
    "nemotron_h": {"use_bias": False, "time_step_limit": (0.0, float("inf"))},  # (llama.cpp never clamps)
    "nemotron_h-moe": {},  # (Nemotron 3: llama.cpp's nemotron_h_moe)
}


def tiny_with_lora(arch, path, **overrides):
    make_hf_model(arch, path, **overrides)
    save_tiny_tokenizer(path)
    return tiny_lora_model(path, seed=3, dora=arch == "qwen2").eval(), formats.load_tokenizer(str(path))


@pytest.mark.parametrize("arch", families(ARCH_CONFIGS))
def test_merged_directory_loads_in_transformers(arch, tmp_path):
    import transformers
    m, tok = tiny_with_lora(arch, tmp_path / "base")
    export.export_merged(m, tok, str(tmp_path / "merged"), dtype=torch.float32)
    files = set(os.listdir(tmp_path / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja"} <= files
    kw = {"attn_implementation": "eager"} if arch in EAGER else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), **kw).float().eval()
    ids = torch.randint(3, 100, (2, 11))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - m.logits(m(ids))).abs().max() < 1e-4


def test_merged_export_shards_and_4bit_base(tmp_path):
    import quant
    make_hf_model("llama", tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    m = formats.load_model(str(tmp_path / "base"), prepare=quant.prepare_4bit)
    lora.apply_lora(m, r=2, alpha=4)
    tok = formats.load_tokenizer(str(tmp_path / "base"))
    export.export_merged(m, tok, str(tmp_path / "m"), dtype=torch.float32, shard_bytes=30_000)
    names = os.listdir(tmp_path / "m")
    assert "model.safetensors.index.json" in names and sum("-of-" in n for n in names) > 1
    again = formats.load_model(str(tmp_path / "m"))
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():  # a 4-bit base is dequantized, then merged
        assert (again.logits(again(ids)) - m.logits(m(ids))).abs().max() < 1e-5


def llama_cpp_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.reset()
    llm.eval(ids)
    out = torch.tensor(llm.scores[: len(ids)])
    del llm
    return out


# ggml's CPU GELU looks its value up in a table over fp16 inputs and outputs: Gemma 4 (GELU in every MLP and
# per-layer-input gate, init 0.1) measured 5.2e-3 off in f32, 4.1e-4 once nanotune's GELU was rounded the same way
F32_TOL = {"gemma4_text": 8e-3}
# q8_0's share of equal top-1s: the tiny Qwen3.5-MoE and Qwen3-Next flip near-ties through their routers (0.925
# at inits 0.02 to 0.07, and 0.900; their f32 files are within 1e-3, f16 within 2e-2)
Q8_TOP1 = {"qwen3_5_moe_text": 0.9, "qwen3_next": 0.85}


@pytest.mark.parametrize("arch", families(GGUF_ARCHS))
def test_gguf_runs_in_llama_cpp_with_nanotunes_logits(arch, tmp_path):
    m, tok = tiny_with_lora(arch, tmp_path / "base", **GGUF_ARCHS[arch])
    ids = torch.randint(5, 100, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = m.logits(m(torch.tensor([ids])))[0]
    for q, tol in (("f32", F32_TOL.get(arch, 1e-3)), ("f16", 2e-2), ("q8_0", None)):
        path = tmp_path / f"m-{q}.gguf"
        export.export_gguf(m, tok, str(path), q)
        got = llama_cpp_logits(path, ids)
        if tol:
            assert (got - want).abs().max() < tol, (arch, q, (got - want).abs().max().item())
        else:
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= Q8_TOP1.get(arch, 0.95), (arch, q)
        back = formats.load_model(str(path))  # nanotune reads every file it writes, to the same precision
        with torch.no_grad():
            mine = back.logits(back(torch.tensor([ids])))[0]
        if tol:
            scale = want.abs().max().clamp_min(1)  # (fp32 rounding of the LoRA path vs the merged weights grows
            assert (mine - want).abs().max() < (1e-5 * scale if q == "f32" else tol), (arch, q)  # with the logits)
        else:
            assert (mine.argmax(-1) == want.argmax(-1)).float().mean() >= Q8_TOP1.get(arch, 0.95), (arch, q)


def assert_same_as_ggufs_reader(path):
    import gguf
    import numpy as np
    import ggufread
    theirs, ours = gguf.GGUFReader(path), ggufread.read(str(path))
    want = {k: f.contents() for k, f in theirs.fields.items()}
    assert list(ours.meta) == list(want)
    for k, v in want.items():
        got = ours.meta[k]
        assert got == v and type(got) is type(v), k
        assert not isinstance(v, list) or [type(x) for x in got] == [type(x) for x in v], k
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.shape) == (b.tensor_type, tuple(b.shape.tolist())), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("arch", ["llama", "gemma4_text", "apertus", "qwen3_5_moe_text", "gpt_oss"])
def test_ggufread_reads_what_ggufs_reader_reads(arch, tmp_path):
    """ggufread against gguf's GGUFReader on files export writes: float and block types, per-layer arrays
    (Gemma 4's sliding pattern of bools, Apertus' xIELU arrays), stacked experts, a recurrent mixer's tensors."""
    m, tok = tiny_with_lora(arch, tmp_path / "base", **GGUF_ARCHS.get(arch, {}))
    for q in ("f32", "f16", "bf16", "q8_0", "q4_1")[: 5 if arch == "llama" else 2]:
        path = tmp_path / f"m-{q}.gguf"
        export.export_gguf(m, tok, str(path), q)
        assert_same_as_ggufs_reader(path)


def test_ggufread_refuses_a_cut_file(tmp_path):
    """A GGUF cut anywhere (in the header, the metadata, the tensor infos or the data) is refused in one sentence."""
    m, tok = tiny_with_lora("llama", tmp_path / "base")
    path = tmp_path / "m.gguf"
    export.export_gguf(m, tok, str(path), "f16")
    whole = path.read_bytes()
    for n in (3, 20, len(whole) // 8, len(whole) // 2, len(whole) - 1):
        cut = tmp_path / f"cut-{n}.gguf"
        cut.write_bytes(whole[:n])
        with pytest.raises(NanotuneError, match="could not be read as GGUF.*truncated or corrupt"):
            formats.read_gguf(str(cut))


def test_gguf_llama_cpp_would_run_differently_is_refused(tmp_path):
    """llama.cpp's exaone4 rotates every layer (measured: its logits equal nanotune's with RoPE everywhere, 3e-7,
    and differ by 0.03-0.1 with EXAONE 4.0's NoPE full layers); its olmoe clamps q, k, v elsewhere (0.16 off with
    clip_qkv 1.5, 2e-7 without): such a model's GGUF is refused, nothing written."""
    m, tok = tiny_with_lora("exaone4", tmp_path / "base")
    with pytest.raises(NanotuneError, match="full-attention layers have no RoPE"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("olmoe", tmp_path / "olmoe")  # (OLMoE's clip_qkv: llama.cpp clamps elsewhere)
    with pytest.raises(NanotuneError, match="clamps q, k, v elsewhere"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("llama4_text", tmp_path / "llama4")  # (llama.cpp fixes its chunk at 8192)
    with pytest.raises(NanotuneError, match="llama4 fixes attention_chunk_size at 8192 .* this model has 4"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("falcon-rw", tmp_path / "falcon")  # (llama.cpp's falcon: parallel, RoPE, no biases)
    with pytest.raises(NanotuneError, match="llama.cpp's falcon runs parallel blocks with RoPE"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("phimoe", tmp_path / "phimoe")  # (llama.cpp's phimoe: RMSNorm, another router)
    with pytest.raises(NanotuneError, match="llama.cpp's phimoe normalises with RMSNorm"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    # Gemma 4: llama.cpp's sharing layers read the last sliding / full layer before the first of them, fixed by
    # position (here layer 1 is the sliding one; a sliding sharing layer would read layer 0, a full one)
    m, tok = tiny_with_lora("gemma4_text", tmp_path / "gemma4", layer_types=["full_attention", "sliding_attention",
                                                                             "sliding_attention", "full_attention"])
    with pytest.raises(NanotuneError, match="llama.cpp's gemma4 needs a sliding layer and, where layers share k/v"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("lfm2", tmp_path / "lfm2", conv_bias=True)  # (llama.cpp's lfm2 loads no biases)
    with pytest.raises(NanotuneError, match="llama.cpp's lfm2 loads no convolution or projection biases"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("deepseek_v3-yarn", tmp_path / "deepseek")  # (YaRN's mscale 0.707 != mscale_all_dim)
    with pytest.raises(NanotuneError, match="llama.cpp's deepseek2 scales YaRN's attention by mscale_all_dim alone"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("granitemoehybrid-dense", tmp_path / "granite")  # (a time-step clamp, Mamba2 biases)
    with pytest.raises(NanotuneError, match="llama.cpp's granitehybrid loads no Mamba2 in_proj / out_proj biases"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("nemotron_h-moe", tmp_path / "nemotron", layers_block_type=[
        "linear_attention", "moe", "full_attention", "mlp"])  # (llama.cpp's nemotron_h_moe: every MLP an MoE)
    with pytest.raises(NanotuneError, match="llama.cpp's nemotron_h_moe makes every MLP layer of a model with experts"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    m, tok = tiny_with_lora("gemma4_text", tmp_path / "gemma4", vocab_size_per_layer_input=64)
    with pytest.raises(NanotuneError, match="looks per-layer inputs up over the whole vocabulary \\(128\\)"):
        export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f16")
    assert sorted(os.listdir(tmp_path)) == ["base", "deepseek", "falcon", "gemma4", "granite", "lfm2", "llama4",
                                            "nemotron", "olmoe", "phimoe"]  # (no GGUF, no temp)


def test_kquant_and_ollama_modelfile(tmp_path, capfd):
    pytest.importorskip("llama_cpp")
    m, tok = tiny_with_lora("llama", tmp_path / "base")
    capfd.readouterr()
    export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "q4_k_m")
    err = capfd.readouterr().err.strip().splitlines()  # one line on the fallback, none of llama.cpp's log
    want = "16 of 16 weight matrices have rows of 64, 112 values, not a multiple of 256"
    assert len(err) == 1 and want in err[0], err
    assert formats.load_model(str(tmp_path / "m.gguf")).config.num_hidden_layers == 2
    text = export.ollama_modelfile(str(tmp_path / "m.gguf"), tok, system="Be brief.")
    assert text.startswith("FROM ./m.gguf\nTEMPLATE") and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Be brief."""' in text and "<|im_start|>assistant" in text


def run_export(args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_export_errors_are_clear_and_leave_nothing(tmp_path):
    m, tok = tiny_with_lora("llama", tmp_path / "a")
    lora.save_adapter(m, str(tmp_path / "ad"))
    make_hf_model("qwen3", tmp_path / "b")  # q_proj is 128 wide there, 64 here
    save_tiny_tokenizer(tmp_path / "b")
    r = run_export(["--model", str(tmp_path / "b"), "--adapter", str(tmp_path / "ad"), "--format", "gguf",
                    "--out", str(tmp_path / "x.gguf")])
    assert r.returncode == 1 and "another base" in r.stderr and not os.path.exists(tmp_path / "x.gguf")
    r = run_export(["--model", str(tmp_path / "a"), "--format", "gguf", "--quant", "q3_x",
                    "--out", str(tmp_path / "y.gguf")])
    assert r.returncode == 1 and "unknown quant type 'q3_x'" in r.stderr and not os.path.exists(tmp_path / "y.gguf")
    (tmp_path / "exists.gguf").write_text("keep me")
    r = run_export(["--model", str(tmp_path / "a"), "--format", "gguf", "--out", str(tmp_path / "exists.gguf")])
    assert r.returncode == 1 and "--overwrite" in r.stderr and (tmp_path / "exists.gguf").read_text() == "keep me"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_gpt_oss_gguf_with_untruncated_yarn_warns_and_reads_back_as_llama_cpp_runs_it(tmp_path, capfd):
    """gpt-oss's YaRN leaves its correction range unrounded (truncate=false); llama.cpp always rounds it, as in every
    gpt-oss GGUF. The export says so, and nanotune reads the file back as llama.cpp runs it (rounded), to f32 noise."""
    m, tok = tiny_with_lora("gpt_oss", tmp_path / "base", swiglu_limit=7.0)
    assert m.config.rope_scaling["truncate"] is False
    export.export_gguf(m, tok, str(tmp_path / "m.gguf"), "f32")
    assert "llama.cpp rounds YaRN's correction range" in capfd.readouterr().err
    ids = torch.randint(5, 100, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    back = formats.load_model(str(tmp_path / "m.gguf"))
    assert back.config.rope_scaling.get("truncate", True)
    with torch.no_grad():
        mine, want = (x.logits(x(torch.tensor([ids])))[0] for x in (back, m))
    got = llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert (got - mine).abs().max() < 1e-3
    print(f"gpt-oss tiny: llama.cpp vs transformers' untruncated YaRN {(got - want).abs().max():.2e}")


def parse_ollama_modelfile(text):
    """Ollama's own Modelfile parser (parser/parser.go, ParseFile), ported line for line: -> [(command, value)]."""
    commands, state, buf, name, role = [], "nil", "", None, ""

    def step(r, cs):  # parseRuneForState: (next state, the rune to keep or None)
        space, newline = r in " \t", r in "\r\n"
        if cs == "nil":
            return ("comment", None) if r == "#" else ("nil", None) if space or newline else ("name", r)
        if cs == "name":
            if r.isascii() and r.isalpha():
                return "name", r
            assert space, "invalid command"
            return "value", None
        if cs == "value":
            return ("nil", r) if space or newline else ("value", r)
        if cs in ("parameter", "message"):
            if r.isascii() and (r.isalnum() or r == "_") if cs == "parameter" else r.isascii() and r.isalpha():
                return cs, r
            assert space, "unexpected end"
            return "value", None
        return ("nil", None) if newline else ("comment", None)

    def unquote(s):
        if s[:3] == '"""':
            return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
        if s[:1] == '"':
            return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
        return s, True

    for r in text:
        nxt, keep = step(r, state)
        if nxt != state:
            if state == "name":
                s = buf.lower()
                assert s in ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                             "parameter", "message", "requires"), f"invalid command {buf!r}"
                name = "model" if s == "from" else s
                nxt = {"parameter": "parameter", "message": "message"}.get(s, nxt)
            elif state == "parameter":
                name = buf
            elif state == "message":
                role = buf
            elif state == "value":
                s, ok = unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((name, f"{role}: {s}" if role else s))
                role = ""
            buf, state = "", nxt
        if keep is not None and keep.isprintable():
            buf += keep
    if state == "value":
        s, ok = unquote(buf.strip())
        assert ok, "unexpected end of file"
        commands.append((name, f"{role}: {s}" if role else s))
    return commands


def test_modelfile_holds_exactly_the_directives_nanotune_meant(tmp_path, capfd):
    """Text from a downloaded chat template or from --system cannot add Modelfile directives (ADAPTER, PARAMETER):
    parsed back with Ollama's own parser, the Modelfile holds FROM, TEMPLATE, the stops and SYSTEM, nothing else."""
    from tokenizer import CHATML, chat_turns, ollama_stops, ollama_template
    save_tiny_tokenizer(tmp_path)
    tok = formats.load_tokenizer(str(tmp_path))
    turns = chat_turns(tok)
    meant = [("model", "./m.gguf"), ("template", ollama_template(turns))] + [("stop", s) for s in ollama_stops(turns)]
    evil = 'You are helpful."""\nADAPTER /tmp/evil-adapter.gguf\nPARAMETER num_ctx 1\nSYSTEM """x'
    assert ("adapter", "/tmp/evil-adapter.gguf") in parse_ollama_modelfile(f'FROM ./m.gguf\nSYSTEM """{evil}"""\n')
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + evil + "<|im_end|>\n"
                         "{% endif %}" + CHATML)  # (the model's own template's default system prompt)
    assert chat_turns(tok).system == evil
    assert parse_ollama_modelfile(export.ollama_modelfile("m.gguf", tok)) == meant
    assert "cannot quote" in capfd.readouterr().err
    with pytest.raises(NanotuneError, match='--system holds """'):
        export.ollama_modelfile("m.gguf", tok, system=evil)
    lines = "Be brief.\nADAPTER /tmp/evil-adapter.gguf\nPARAMETER num_ctx 1"  # newlines stay inside the value
    assert parse_ollama_modelfile(export.ollama_modelfile("m.gguf", tok, system=lines)) == meant + [("system", lines)]
    with pytest.raises(NanotuneError, match="FROM cannot hold"):
        export.ollama_modelfile("m x.gguf\nADAPTER e.gguf", tok)


@pytest.mark.slow
def test_overwrite_replaces_only_nanotunes_own_results(tmp_path):
    """--overwrite never deletes a directory or file of the user's that sits at --out (nor their Modelfile): it
    replaces only an earlier nanotune export of that format, and refuses anything else in one sentence."""
    make_hf_model("llama", tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    base = ["--model", str(tmp_path / "base")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    for fmt in ("merged", "gguf"):
        r = run_export(base + ["--format", fmt, "--out", str(tmp_path / "mine"), "--overwrite"])
        assert r.returncode == 1 and "nanotune will not replace it" in r.stderr, r.stderr[-500:]
        assert len(r.stderr.strip().splitlines()) == 1 and (tmp_path / "mine" / "thesis.tex").exists()
    (tmp_path / "notes.gguf").write_text("not a model")
    r = run_export(base + ["--format", "gguf", "--out", str(tmp_path / "notes.gguf"), "--overwrite"])
    assert r.returncode == 1 and "not a GGUF file" in r.stderr
    assert (tmp_path / "notes.gguf").read_text() == "not a model"
    for _ in range(2):  # an earlier nanotune export is replaced
        r = run_export(base + ["--format", "merged", "--out", str(tmp_path / "merged"), "--overwrite"])
        assert r.returncode == 0, r.stderr[-500:]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "Modelfile").write_text("FROM llama3\nSYSTEM my own\n")
    gguf_out = ["--format", "gguf", "--out", str(tmp_path / "out" / "m.gguf"), "--ollama", "--overwrite"]
    r = run_export(base + gguf_out)
    assert r.returncode == 1 and "not a Modelfile nanotune wrote" in r.stderr
    assert (tmp_path / "out" / "Modelfile").read_text() == "FROM llama3\nSYSTEM my own\n"
    (tmp_path / "out" / "Modelfile").unlink()
    for _ in range(2):  # its own Modelfile and GGUF are replaced
        r = run_export(base + gguf_out)
        assert r.returncode == 0 and (tmp_path / "out" / "Modelfile").read_text().startswith("FROM ./m.gguf\n")


def test_verify_checks_the_trained_chat_template_and_its_stop_ids(tmp_path, capsys):
    """--verify (the default) also reads back the chat template and the stop ids: the merged dir (transformers'
    tokenizer and generation config) and the GGUF (llama.cpp's metadata and end-of-generation tokens) carry the
    trained template and stop at <|im_end|>, which ends its turns; an export whose template or stop ids differ from
    the trained ones fails with a sentence that says which."""
    make_hf_model("llama", tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base", template=tokenizer.BUILTIN_TEMPLATES["chatml"] + " ")
    export.main(["--model", str(tmp_path / "base"), "--format", "merged", "--dtype", "float32", "--out",
                 str(tmp_path / "m")])
    assert "verify: the trained chat template and its turn end (<|im_end|>) as stop ids, as transformers reads" \
        in capsys.readouterr().out
    tok = formats.load_tokenizer(str(tmp_path / "base"))
    other = formats.load_tokenizer(str(tmp_path / "base"))
    other.chat_template = tokenizer.BUILTIN_TEMPLATES["chatml"]  # (the same but for one trailing space)
    with pytest.raises(NanotuneError, match="verify failed: the chat template transformers reads from .* is not the "
                                            "one the model was trained with"):
        export.verify_chat("merged", str(tmp_path / "m"), other)
    gen = tmp_path / "m" / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": tok.token_id("</s>")}))
    with pytest.raises(NanotuneError, match=r"verify failed: transformers does not stop generating at <\|im_end\|> "):
        export.verify_chat("merged", str(tmp_path / "m"), tok)
    pytest.importorskip("llama_cpp")
    export.main(["--model", str(tmp_path / "base"), "--format", "gguf", "--quant", "f32", "--out",
                 str(tmp_path / "m.gguf")])
    assert "(<|im_end|>) as stop ids, as llama.cpp reads" in capsys.readouterr().out
    with pytest.raises(NanotuneError, match="the chat template llama.cpp reads"):
        export.verify_chat("gguf", str(tmp_path / "m.gguf"), other)


@pytest.mark.parametrize("prepare", ["prepare_4bit", "prepare_fp8"])
def test_the_adapter_of_a_4bit_or_fp8_base_verifies_over_the_checkpoints_own_weights(prepare, tmp_path, capsys):
    """A QLoRA (or FP8-base) adapter export: PEFT applies it to the checkpoint's 16-bit base, so verify compares
    PEFT's reading with nanotune's over that base (not with the 4-bit / FP8 model in memory, which differs by the
    base's rounding: the export was refused before, KL 1.7e-4 against 1e-5)."""
    import quant
    make_hf_model("llama", tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    m = tiny_lora_model(tmp_path / "base", prepare=getattr(quant, prepare))
    tok = formats.load_tokenizer(str(tmp_path / "base"))
    export.export_adapter(m, str(tmp_path / "ad"), str(tmp_path / "base"), torch.float32, tok=tok)
    export.verified("adapter", str(tmp_path / "ad"), m, tok, str(tmp_path / "base"), "float32")
    said = capsys.readouterr().out
    assert "checked over the checkpoint's own weights" in said and "verify: passed" in said


def test_no_inf_is_written_and_a_failed_verify_is_moved_aside(tmp_path, monkeypatch):
    """--dtype float16 on weights past float16's range is refused (it wrote inf, only --verify noticed), leaving no
    directory; an export that fails verification (on by default) is moved to <out>.unverified, not left under its
    finished name; --no_verify skips it."""
    make_hf_model("llama", tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    m = formats.load_model(str(tmp_path / "base"))
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    formats.save_hf(m, str(tmp_path / "big"), formats.load_tokenizer(str(tmp_path / "base")))
    with pytest.raises(NanotuneError, match="up_proj.weight holds values that float16 cannot represent"):
        export.main(["--model", str(tmp_path / "big"), "--format", "merged", "--dtype", "float16",
                     "--out", str(tmp_path / "m16")])
    assert not [p for p in os.listdir(tmp_path) if p.startswith("m16")]
    real = export.reader_logits
    monkeypatch.setattr(export, "reader_logits", lambda *a: (lambda who, got: (who, [g + torch.randn_like(g) * 5
                                                                                     for g in got]))(*real(*a)))
    with pytest.raises(NanotuneError, match=r"verify failed.*moved to .*m32\.unverified"):  # (verify: the default)
        export.main(["--model", str(tmp_path / "base"), "--format", "merged", "--dtype", "float32",
                     "--out", str(tmp_path / "m32")])
    assert not os.path.exists(tmp_path / "m32") and os.path.isfile(tmp_path / "m32.unverified" / "config.json")
    export.main(["--model", str(tmp_path / "base"), "--format", "merged", "--dtype", "float32", "--out",
                 str(tmp_path / "m32b"), "--no_verify"])  # (skipped on request: the export stays)
    assert os.path.isfile(tmp_path / "m32b" / "config.json")
