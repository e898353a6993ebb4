"""NF4 against bitsandbytes (its CPU backend): bytes, absmax, double quantization, dequantized values,
checkpoints both ways; the Triton dequantize against the reference; QLoRA training."""
import os

import pytest
import torch
from conftest import make_hf_model

import kernels
import lora
import formats
import quant
from cli import NanotuneError

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

SHAPES = [(128, 64), (7, 45), (300, 257), (1, 1), (33,), (3, 123)]  # not multiples of 64 / 256, odd counts


def test_tables_equal_bitsandbytes():
    assert torch.equal(quant.NF4, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quant.DYNAMIC, BF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_bytes_absmax_and_values_equal_bitsandbytes(dtype, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=dtype)
    packed, st = BF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = quant.quantize_nf4(w, double_quant=False)
    assert torch.equal(ours["weight"], packed) and torch.equal(ours["absmax"], st.absmax)
    assert torch.equal(quant.dequantize_nf4(ours), BF.dequantize_4bit(packed, st))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(300, 257), (1024, 1024 + 7), (7, 45)])
@pytest.mark.parametrize("chunk", [None, 64 * 5])
def test_double_quant_equals_bitsandbytes(dtype, shape, chunk, monkeypatch):
    """Packed bytes, offset, nested absmax and the 8-bit absmax codes equal bitsandbytes'; so do the
    dequantized weights."""
    if chunk:  # quantized a few blocks at a time (as a large stack of experts is): the same bytes
        monkeypatch.setattr(quant, "CHUNK", chunk)
    torch.manual_seed(1)
    w = torch.randn(*shape, dtype=dtype)
    packed, st = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = quant.quantize_nf4(w, double_quant=True)
    assert torch.equal(ours["weight"], packed)
    assert ours["offset"] == float(st.offset) and torch.equal(ours["nested_absmax"], st.state2.absmax)
    assert torch.equal(ours["absmax"], st.absmax)
    assert torch.equal(quant.dequantize_nf4(ours), BF.dequantize_4bit(packed, st))


def test_dynamic_codes_equal_bitsandbytes_at_every_boundary():
    """The 8-bit rule itself, probed where it matters: values on both sides of every decision boundary
    (each block holds a 1.0, so the scaled value is the value), including 0 and the smallest codes."""
    code = quant.DYNAMIC
    mids = ((code[:-1].double() + code[1:].double()) / 2).float()
    eps = torch.tensor([-3e-5, -1e-5, -1e-6, 0.0, 1e-6, 1e-5, 3e-5])
    x = torch.cat([code, (mids[:, None] + eps).reshape(-1), torch.linspace(-1, 1, 20001)]).clamp(-1, 1)
    x = x[: x.numel() // 255 * 255].view(-1, 255)
    blocks = torch.cat([torch.ones(x.shape[0], 1), x], 1).reshape(-1)
    theirs, _ = BF.quantize_blockwise(blocks, code=code, blocksize=256)
    ours, _ = quant.blockwise_absmax_codes(blocks, code, 256, lut=quant.DYNAMIC_LUT)
    assert torch.equal(ours, theirs)
    nearest, _ = quant.blockwise_absmax_codes(blocks, code, 256)
    assert not torch.equal(nearest, theirs)  # the rule matters: exact nearest is not what bitsandbytes does


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_dequantize_equals_reference_bit_for_bit(dtype, shape):
    torch.manual_seed(2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # real Triton on a GPU, the interpreter on CPU
    for dq in (True, False):  # the Triton kernel expands a double-quantized absmax itself
        st = quant.quantize_nf4(torch.randn(*shape, dtype=dtype, device=dev) * 3, double_quant=dq)
        absmax = kernels.nf4_absmax(st["absmax"], quant.DYNAMIC.to(dev), st.get("nested_absmax"), st.get("offset", 0))
        ref = kernels.nf4_dequantize_ref(st["weight"], absmax, quant.NF4.to(dev), st["shape"], dtype)
        tri = kernels.nf4_dequantize_triton(st["weight"], st["absmax"], quant.NF4.to(dev), st["shape"], dtype,
                                            quant.DYNAMIC.to(dev), st.get("nested_absmax"), st.get("offset", 0))
        assert torch.equal(ref, tri)


def bnb_model(tmp_path, double_quant=True):
    import transformers
    make_hf_model("llama", tmp_path / "dense", intermediate_size=128)  # bnb's CPU matmul needs multiples of 32
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), quantization_config=cfg,
                                                             dtype=torch.float32, device_map="cpu").eval()


def dense_twin(hf_q, tmp_path):
    """The same architecture with every 4-bit weight replaced by bitsandbytes' own dequantization."""
    import transformers
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), dtype=torch.float32).eval()
    with torch.no_grad():
        for n, mod in hf_q.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                dense.get_submodule(n).weight.copy_(BF.dequantize_4bit(mod.weight.data, mod.weight.quant_state))
    return dense


def check_against_bnb(ours, hf_q, tmp_path):
    for n, mod in hf_q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mine = ours.get_submodule(n)
            assert isinstance(mine, quant.Linear4bit), n
            theirs = BF.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            assert torch.equal(mine.dense_weight(torch.float32), theirs), n
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        got = ours.logits(ours(ids))
        exact = dense_twin(hf_q, tmp_path)(input_ids=ids).logits
        theirs = hf_q(input_ids=ids).logits
    assert (got - exact).abs().max() < 1e-5  # same weights, same math
    assert (got - theirs).abs().max() < 1e-2  # bnb's CPU 4-bit matmul itself rounds (measured ~2e-3)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_checkpoint_loads_into_nanotune(tmp_path, double_quant):
    hf_q = bnb_model(tmp_path, double_quant)
    hf_q.save_pretrained(str(tmp_path / "bnb"))
    check_against_bnb(formats.load_model(str(tmp_path / "bnb")), hf_q, tmp_path)


def test_nanotune_4bit_checkpoint_loads_in_transformers(tmp_path):
    import transformers
    bnb_model(tmp_path)  # writes tmp_path/dense
    ours = formats.load_model(str(tmp_path / "dense"), prepare=quant.prepare_4bit)  # quantized while loading
    formats.save_4bit(ours, str(tmp_path / "ours4"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours4"), dtype=torch.float32,
                                                             device_map="cpu").eval()  # on CPU on a GPU machine too
    check_against_bnb(ours, back, tmp_path)


def test_quantize_while_loading_equals_quantizing_after(tmp_path):
    make_hf_model("qwen2", tmp_path)
    a = formats.load_model(str(tmp_path), prepare=quant.prepare_4bit)
    b = quant.quantize_model(formats.load_model(str(tmp_path)))
    assert isinstance(a.lm_head, torch.nn.Linear) and isinstance(a.model.embed_tokens, torch.nn.Embedding)
    ids = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(a.logits(a(ids)), b.logits(b(ids)))


def test_qlora_backward_matches_dense_lora_and_keeps_no_dense_weight(tmp_path):
    make_hf_model("llama", tmp_path)
    q = formats.load_model(str(tmp_path), prepare=quant.prepare_4bit)
    torch.manual_seed(0)
    lora.apply_lora(q, r=4, alpha=8)
    layer = q.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    saved = [t for t in y.grad_fn.next_functions if t[0] is not None]
    assert saved  # (autograd graph exists)
    y.sum().backward()
    w = layer.base.dense_weight(torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    ref = x2 @ w.t() + layer.lora_B(layer.lora_A(x2)) * layer.scaling
    ref.sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


STEP_IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def adapted_step(m):
    """LoRA r4 on m (B drawn non-zero, the same for a model and its twin), one backward of the logits' logsumexp on
    fixed ids -> (logits, every adapter gradient)."""
    torch.manual_seed(0)
    lora.apply_lora(m, r=4, alpha=8)
    for _, layer in lora.lora_layers(m):
        for _, b in layer.pairs():
            b.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(b.numel()))
    out = m.logits(m(STEP_IDS))
    out.float().logsumexp(-1).sum().backward()
    return out.detach(), [p.grad for _, layer in lora.lora_layers(m) for pair in layer.pairs() for p in pair]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "gpt_oss", "qwen3_5_moe_text", "qwen3_next",
                                  "nemotron_h-moe"])
def test_4bit_experts_hold_nf4_of_the_stacked_weights_and_compute_with_them(arch, tmp_path):
    """QLoRA on a MoE: the experts (the bulk of its bytes) load as NF4, byte for byte quantize_nf4 of each stacked
    [E, out, in] weight (bitsandbytes' bytes, tested above); quantizing while loading equals quantizing after;
    the 4-bit model's logits equal a dense model holding the dequantized weights; LoRA on the 4-bit experts
    trains (gradients equal the dense twin's) and its merged export loads in transformers with its logits."""
    import transformers
    from conftest import save_tiny_tokenizer
    import export
    from mlp import Experts
    make_hf_model(arch, tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    q = formats.load_model(str(tmp_path / "hf"), prepare=quant.prepare_4bit)
    dense = formats.load_model(str(tmp_path / "hf"))
    experts = [(n, m) for n, m in q.named_modules() if isinstance(m, quant.QuantExperts)]
    assert experts and not any(type(m) is Experts for m in q.modules())
    for n, m in experts:
        for p in m.shapes:
            w = getattr(dense.get_submodule(n), p)
            assert torch.equal(getattr(m, p).packed(), quant.quantize_nf4(w)["weight"])
    assert torch.equal(*(x.logits(x(torch.arange(3, 12)[None])) for x in (q, quant.quantize_model(
        formats.load_model(str(tmp_path / "hf"))))))
    with torch.no_grad():  # the dense twin: every 4-bit weight replaced by its dequantized values
        for n, m in q.named_modules():
            if isinstance(m, quant.QuantExperts):
                for p in m.shapes:
                    getattr(dense.get_submodule(n), p).copy_(m.dense(p, torch.float32))
            elif isinstance(m, quant.Linear4bit) and not n.endswith(("experts.gate_up_proj", "experts.down_proj")):
                dense.get_submodule(n).weight.copy_(m.dense_weight(torch.float32))
    (lq, gq), (ld, gd) = (adapted_step(m) for m in (q, dense))
    assert (lq - ld).abs().max() < 1e-5 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gq, gd))
    export.export_merged(q.eval(), formats.load_tokenizer(str(tmp_path / "hf")), str(tmp_path / "merged"),
                         dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
    with torch.no_grad():
        assert (hf(input_ids=STEP_IDS).logits - lq).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_fp8_experts_hold_e4m3_rows_of_the_stacked_weights_and_train(arch, tmp_path):
    """--base_dtype float8 on a MoE: the routed experts (the bulk of its bytes) load as e4m3, one byte a value with
    a scale per row (one expert's output), each stacked weight kernels.fp8_rows of the checkpoint's; with only the
    experts in FP8 (the projections' FP8 GEMMs round activations too: tested in test_lora) the logits and every
    LoRA gradient, experts' adapters included, equal a dense twin holding the dequantized values; merging into
    them in place is refused."""
    from mlp import Experts
    make_hf_model(arch, tmp_path / "hf")
    dense = formats.load_model(str(tmp_path / "hf"))
    full = formats.load_model(str(tmp_path / "hf"), prepare=quant.prepare_fp8)
    assert all(type(m) is quant.Linear8 for n, m in full.named_modules() if n.endswith(("q_proj", "o_proj")))
    for n, m in full.named_modules():
        for p in m.shapes if isinstance(m, quant.QuantExperts) else ():
            lin, w = getattr(m, p), getattr(dense.get_submodule(n), p)
            codes, scale = kernels.fp8_rows(w.reshape(-1, w.shape[-1]).float())
            assert type(lin) is quant.Linear8 and lin.weight.element_size() == 1
            assert torch.equal(lin.weight.view(torch.uint8), codes.view(torch.uint8))
            assert torch.equal(lin.weight_scale, scale)
    names = tuple({n.rpartition(".")[2] for n, x in dense.named_modules() if type(x) is torch.nn.Linear})
    q = formats.load_model(str(tmp_path / "hf"), prepare=lambda m: quant.prepare_fp8(m, skip=names))
    experts = [(n, m) for n, m in q.named_modules() if isinstance(m, quant.QuantExperts)]
    assert experts and not any(type(m) is Experts for m in q.modules())
    assert not any(type(m) is quant.Linear8 for n, m in q.named_modules() if ".experts." not in n)
    with torch.no_grad():  # the dense twin: the experts' stacks replaced by their dequantized values
        for n, m in experts:
            for p in m.shapes:
                getattr(dense.get_submodule(n), p).copy_(m.dense(p, torch.float32))
    (lq, gq), (ld, gd) = (adapted_step(m) for m in (q, dense))
    assert (lq - ld).abs().max() < 1e-5 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gq, gd))
    moe = [layer for _, layer in lora.lora_layers(q) if isinstance(layer, lora.LoRAExperts)]
    assert moe and all(g.abs().max() > 0 for g in gq)
    with pytest.raises(NanotuneError, match="4-bit or FP8 experts"):
        moe[0].merge()


@pytest.mark.slow
@pytest.mark.default_model
def test_qlora_training_lowers_loss_on_the_default_model(tmp_path):
    import json
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "qlora"
    r = subprocess.run([sys.executable, "train.py", "--load_in_4bit", "true", "--max_steps", "8",
                        "--output_dir", str(out), "--sample_prompts_file", ""], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl")]
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 / 2, losses
    assert "trainable" in r.stderr and (out / "adapter" / "adapter_model.safetensors").exists()


def test_mxfp4_experts_load_as_transformers_dequantizes_them(tmp_path):
    """gpt-oss ships its experts in MXFP4 (`*_blocks` / `*_scales`, quant_method mxfp4): nanotune reads them into
    16/32-bit weights equal to transformers' own dequantization (convert_moe_packed_tensors), so the logits equal
    transformers' model holding those weights; for QLoRA they go on to NF4 as they load (= quantizing after)."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    hf = make_hf_model("gpt_oss", tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    c = hf.config
    shapes = {"gate_up_proj": (2 * c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size)}
    for i, layer in enumerate(hf.model.layers):
        for p, (out, inp) in shapes.items():
            blocks = torch.randint(0, 256, (c.num_local_experts, out, inp // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(118, 125, (c.num_local_experts, out, inp // 32), dtype=torch.uint8, generator=g)
            with torch.no_grad():
                getattr(layer.mlp.experts, p).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            name = f"model.layers.{i}.mlp.experts.{p}"
            del sd[name]
            sd[f"{name}_blocks"], sd[f"{name}_scales"] = blocks, scales
    os.makedirs(tmp_path / "mx")
    save_file(sd, str(tmp_path / "mx" / "model.safetensors"))
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                       "model.layers.*.mlp.router",
                                                                                       "model.embed_tokens", "lm_head"]}
    json.dump(cfg, open(tmp_path / "mx" / "config.json", "w"))
    m = formats.load_model(str(tmp_path / "mx"))
    ids = torch.randint(3, 128, (2, 9), generator=g)
    with torch.no_grad():
        ref, ours = hf(input_ids=ids).logits, m.logits(m(ids))
    assert (ref - ours).abs().max() < 1e-4 and ref.std() > 0.1  # (the MXFP4 experts move the logits visibly)
    shutil.rmtree(tmp_path / "hf")
    q = formats.load_model(str(tmp_path / "mx"), prepare=quant.prepare_4bit)  # QLoRA: MXFP4 -> NF4 while loading
    assert any(isinstance(x, quant.QuantExperts) for x in q.modules())
    with torch.no_grad():
        assert torch.equal(q.logits(q(ids)), quant.quantize_model(m).logits(m(ids)))


def test_a_block_scaled_fp8_checkpoint_loads_one_tensor_at_a_time(tmp_path, capsys):
    """An FP8 release's layout (quant_method "fp8": e4m3 block weights with weight_scale_inv per 32 x 32 block here,
    partial blocks at the 112-wide edges): each weight loads as q times its block's scale, exactly; with
    prepare_fp8 (--base_dtype float8) it is re-rounded to row scales within e4m3's step; the model's logits follow
    the 16-bit model's; a weight whose scales are missing is named."""
    import json
    from safetensors.torch import load_file, save_file
    make_hf_model("llama", tmp_path / "hf")
    sd, blocks, want = load_file(str(tmp_path / "hf" / "model.safetensors")), {}, {}
    for n, t in sd.items():
        if n.endswith("_proj.weight"):
            O, C = t.shape
            amax = torch.nn.functional.pad(t.float().abs(), (0, -C % 32, 0, -O % 32)).reshape(
                -(-O // 32), 32, -(-C // 32), 32).amax((1, 3)).clamp(min=1e-12)
            s = amax / 448
            full = s.repeat_interleave(32, 0)[:O].repeat_interleave(32, 1)[:, :C]
            q = (t.float() / full).to(torch.float8_e4m3fn)
            blocks[n], blocks[n + "_scale_inv"], want[n] = q, s, q.float() * full
        else:
            blocks[n] = t
    os.makedirs(tmp_path / "fp8")
    save_file(blocks, str(tmp_path / "fp8" / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32],
                                  "activation_scheme": "dynamic"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    m = formats.load_model(str(tmp_path / "fp8"))
    got = formats.hf_state_dict(m)
    assert all(torch.equal(got[n], w) for n, w in want.items()) and len(want) == 14
    assert "rounded again" not in capsys.readouterr().out
    m8 = formats.load_model(str(tmp_path / "fp8"), prepare=quant.prepare_fp8)
    assert "base_dtype float8 keeps one scale per row, so the checkpoint's block-scaled FP8" in capsys.readouterr().out
    lin = m8.model.layers[1].mlp.up_proj
    assert type(lin) is quant.Linear8
    w, d = want["model.layers.1.mlp.up_proj.weight"], lin.dense_weight(torch.float32)
    assert ((d - w).abs() <= w.abs().amax(1, keepdim=True) / 16).all()
    own = (w - sd["model.layers.1.mlp.up_proj.weight"].float()).norm()  # (the warning's "about as much again")
    assert 0.5 < (d - w).norm() / own < 2
    ids = torch.randint(3, 128, (1, 9))
    ref = formats.load_model(str(tmp_path / "hf"))
    with torch.no_grad():
        a, b = ref.logits(ref(ids)), m.logits(m(ids))
    assert (a - b).abs().max() <= 0.1 * a.abs().max()
    del blocks["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(blocks, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(NanotuneError, match="lacks the scales .* 'model.layers.0.self_attn.q_proj'"):
        formats.load_model(str(tmp_path / "fp8"))


@pytest.mark.parametrize("kind", sorted(quant.GGUF_BLOCKS))
def test_gguf_blocks_dequantize_as_ggufs_own_code(kind):
    """quant.dequantize_gguf (torch, the default model's Q4_1 and Q8_0 tensors) gives gguf's numpy dequantization
    bit for bit, on random codes under scales and minimums of both signs, across 3 rows of 4 blocks."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    rng = np.random.default_rng(0)
    size = quant.GGUF_BLOCKS[kind]
    blocks = rng.integers(0, 256, (12, size), dtype=np.uint8)
    head = 4 if kind == "Q4_1" else 2
    blocks[:, :head] = rng.normal(0, 0.1, (12, head // 2)).astype(np.float16).view(np.uint8)  # d (and m)
    data = blocks.reshape(3, 4 * size)
    want = quants.dequantize(data, GGMLQuantizationType[kind]).astype("float32")
    got = quant.dequantize_gguf(data, kind, [3, 128])
    assert torch.equal(got, torch.from_numpy(want)) and got.abs().max() > 0
