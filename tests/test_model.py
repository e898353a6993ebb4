"""Tier 1: nanotune's decoder equals transformers' on tiny random models of every supported family."""
import pytest
import torch
import torch.nn.functional as F
from conftest import ARCH_CONFIGS, EAGER, families, make_hf_model

import formats
import kernels
import memory
import model
from mlp import MoE


def padded_batch(vocab, lengths=(12, 9, 7), seed=1):
    """Rows of different lengths: the first full, the second right-padded, the third left-padded."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if i == 2:
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


# the families the packing and KV-cache tests run over (each test adds one of its own)
MANY = ["llama", "ministral", "gemma2", "gemma3", "phi", "olmo2", "granite", "qwen2-yarn", "mixtral", "qwen2_moe",
        "qwen3_moe", "gpt_oss", "arcee", "starcoder2", "smollm3", "olmo3", "seed_oss", "ernie4_5", "glm4", "glm4_moe",
        "llama4_text", "ministral3", "granitemoe", "apertus", "phimoe", "mpt", "falcon", "falcon-40b", "falcon-rw",
        "gemma4_text-moe", "lfm2", "qwen3_5_text", "qwen3_next", "deepseek_v3", "deepseek_v3-yarn", "mistral4",
        "granitemoehybrid", "granitemoehybrid-dense", "nemotron_h", "nemotron_h-moe", "qwen3_5_moe_text",
        "gemma4_text", "ernie4_5_moe", "exaone4", "cohere", "cohere2", "olmoe", "hunyuan_v1_dense"]


@pytest.mark.parametrize("arch", families(ARCH_CONFIGS))
def test_logits_match_transformers_both_ways(arch, tmp_path):
    import transformers
    hf = make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"))
    ids, mask = padded_batch(m.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = m.logits(m(ids, attention_mask=mask))
    valid = mask.bool()
    err = (ref - ours)[valid].abs().max().item()
    assert err < 1e-4, f"{arch}: max |logits - transformers| = {err}"

    # nanotune -> disk -> transformers gives the same logits again
    formats.save_hf(m, str(tmp_path / "ours"))
    kwargs = {"attn_implementation": "eager"} if arch in EAGER else {}
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), **kwargs).float().eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask).logits
    err = (again - ours)[valid].abs().max().item()
    assert err < 1e-4, f"{arch}: transformers reading nanotune's save differs by {err}"


# (LongRoPE is left out: its short/long choice is made per forward from the longest position, in transformers too,
# so a packed row that passes original_max_position_embeddings rotates its short documents differently)
@pytest.mark.parametrize("arch", families(["phi3", *MANY]))
def test_packed_rows_equal_separate_sequences(arch, tmp_path):
    """Two documents packed in one row (positions restart at 0) give the logits each has alone."""
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"))
    a, b = torch.randint(3, 128, (1, 7)), torch.randint(3, 128, (1, 9))
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = m.logits(m(torch.cat([a, b], 1), position_ids=pos))
        alone = torch.cat([m.logits(m(a)), m.logits(m(b))], 1)
    assert (packed - alone).abs().max() < 1e-5


def test_heads_wider_than_flash_take_sdpa_with_the_rows_mask(tmp_path, monkeypatch):
    """Gemma 4's global heads are 512 wide, past flash attention's 256: given PackedRows, such a layer attends
    through SDPA with the mask the rows stand for (whole rows without a window: causal), never varlen. Here the
    flash limit is lowered under the tiny config's 32-wide global heads, so it runs on any device."""
    make_hf_model("gemma4_text", tmp_path / "hf")
    attn = formats.load_model(str(tmp_path / "hf")).model.layers[1].self_attn  # a full-attention layer
    monkeypatch.setattr(kernels, "FLASH_MAX_HEAD", attn.hd - 1)
    monkeypatch.setattr(kernels, "varlen_attention", lambda *a: pytest.fail("varlen attention on wide heads"))
    B, T = 2, 8
    q, k, v = (torch.randn(B, h, T, attn.hd) for h in (attn.nh, attn.nkv, attn.nkv))
    packed = kernels.PackedRows(torch.tensor([0, 3, 8, 13, 16], dtype=torch.int32), 5, None)
    whole = kernels.whole_rows(B, T, {None}, "cpu")[None]
    with torch.no_grad():
        dense = kernels.rows_mask(packed, B, T)
        assert torch.allclose(attn.attend(q, k, v, packed, B, T), attn.attend(q, k, v, dense, B, T))
        assert torch.allclose(attn.attend(q, k, v, whole, B, T), attn.attend(q, k, v, None, B, T))
        assert not torch.allclose(attn.attend(q, k, v, packed, B, T), attn.attend(q, k, v, None, B, T))


@pytest.mark.parametrize("arch", families(["llama", "mistral", "qwen2", "gemma3", "phi", "qwen2_moe", "llama4_text",
                                           "lfm2", "qwen3_5_text", "granitemoehybrid", "deepseek_v3"]))
def test_packed_rows_train_like_separate_sequences(arch, tmp_path, monkeypatch):
    """Packed rows give each document's hidden states and the same gradients as the documents one by
    one: on a GPU through varlen flash attention (bf16; the test counts its calls), on CPU through
    the block-diagonal mask (fp32). mistral has a sliding window of 5, shorter than the documents; llama4_text
    chunks of 4 (on a GPU each chunk a varlen document); LFM2, Qwen3.5 and Granite 4.0-H reset their convolutions
    and recurrent states at each document (on a GPU in bf16); DeepSeek-V3's latent attention too (v padded)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"), dtype=dtype, device=dev).train()
    m.varlen = True
    calls, varlen = [], kernels.varlen_attention
    monkeypatch.setattr(kernels, "varlen_attention", lambda *a: calls.append(1) or varlen(*a))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 128, (1, n), generator=g).to(dev) for n in (5, 11, 16, 9)]
    ids = torch.cat([torch.cat(docs[:2], 1), docs[2], torch.cat([docs[3], docs[3][:, :7]], 1)])  # 3 rows of 16
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(11)]), torch.arange(16),
                       torch.cat([torch.arange(9), torch.arange(7)])]).to(dev)
    w = torch.randn(3, 16, m.config.hidden_size, generator=g).to(dev, dtype)

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])  # not lm_head
    h = m(ids, position_ids=pos)
    packed = grads((h.float() * w.float()).sum())
    hs = [m(d) for d in (*docs, docs[3][:, :7])]
    alone = torch.cat([torch.cat(hs[:2], 1), hs[2], torch.cat(hs[3:], 1)])
    separate = grads((alone.float() * w.float()).sum())
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert (h - alone).float().abs().max() <= tol * alone.float().abs().max()
    assert (packed - separate).abs().max() <= tol * separate.abs().max()
    if dev == "cuda" and kernels.varlen_usable(h, m.config, {None}):
        assert calls, "varlen attention was not used for packed rows on the GPU"


@pytest.mark.parametrize("arch", ["deepseek_v3", "mistral4"])
def test_latent_attention_packs_through_varlen_with_v_padded(arch, tmp_path, monkeypatch):
    """Packed rows through latent attention on the varlen path (flash takes one head width: v, 12 wide, is padded to
    q's 24 and the output cut back): the loss and every gradient equal the mask path's. The flash call is stood in
    for by SDPA with the mask the rows stand for (the GPU runs the real one in the packed-rows test above)."""
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf")).train()
    m.varlen = True
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(7)) + list(range(5))])
    widths = []

    def flash(q, k, v, rows, scale):  # (what flash varlen computes: causal attention inside each document)
        widths.append({q.shape[-1], k.shape[-1], v.shape[-1]})
        return F.scaled_dot_product_attention(q, k, v, attn_mask=kernels.rows_mask(rows, *q.shape[::2]), scale=scale)

    def loss_and_grads():
        m.zero_grad()
        loss = (m(ids, position_ids=pos).float() ** 2).mean()
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    want = loss_and_grads()
    monkeypatch.setattr(kernels, "varlen_usable", lambda *a: True)
    monkeypatch.setattr(kernels, "varlen_attention", flash)
    got = loss_and_grads()
    assert widths and all(w == {m.config.head_dim} for w in widths)
    assert torch.allclose(got[0], want[0], rtol=1e-6) and torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("packed", [False, True])
def test_chunks_as_varlen_documents_stand_for_the_chunk_mask(packed):
    """Llama 4's chunked layers through varlen attention: each chunk of a document (of the row, unpacked) is a
    document of its own; the mask those rows stand for equals the chunk mask attention builds."""
    from attention import attention_mask_for
    B, T, C = 3, 16, 4
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(11)]), torch.arange(16),
                       torch.cat([torch.arange(9), torch.arange(7)])]) if packed else torch.arange(T).expand(B, T)
    rows = kernels.packed_rows(pos, (), C)["chunk"]
    docs = pos.eq(0).cumsum(1) if packed else None
    want = attention_mask_for(B, T, 0, None, docs, None, "cpu", C, pos if packed else None)
    assert torch.equal(kernels.rows_mask(rows, B, T), want)
    assert rows.max_len == C


def test_sharded_checkpoint_loads(tmp_path):
    make_hf_model("qwen2", tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"))
    formats.save_hf(m, str(tmp_path / "sharded"), shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    m2 = formats.load_model(str(tmp_path / "sharded"))
    for (n, p), (_, q) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("arch", families(["mistral", *MANY]))
def test_kv_cache_generation_equals_full_recompute(arch, tmp_path):
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"))
    prompt = [5, 17, 33, 9, 41, 7]
    cached = model.generate(m, prompt, max_new_tokens=12, use_cache=True)
    full = model.generate(m, prompt, max_new_tokens=12, use_cache=False)
    assert cached == full and len(cached) == 12


@pytest.mark.parametrize("arch", families(["llama", "gemma3", "gpt_oss", "deepseek_v3", "llama4_text", "gemma4_text"]))
def test_static_generation_equals_the_cached_one(arch, tmp_path):
    """generate(graphs=True): the decode step static (model.Decoding; on CUDA captured and replayed as CUDA graphs,
    on the CPU run eagerly) gives the cached generation's tokens, greedy and sampled, across a 256-key bucket end."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"), device=dev)
    prompt = [3 + i % 117 for i in range(250)]
    for temperature, seed in ((0.0, None), (1.0, 3)):
        static = model.generate(m, prompt, 12, temperature, seed=seed, graphs=True)
        assert static == model.generate(m, prompt, 12, temperature, seed=seed) and len(static) == 12


@pytest.mark.parametrize("arch", ["granitemoehybrid", "qwen3_5_text"])
def test_static_decoding_asked_of_a_recurrent_model_is_refused(arch, tmp_path):
    """graphs=True (generate, GRPO's rollout) on a model whose SSM / linear-attention layers replace their states
    each step is refused in one sentence saying why (it crashed inside Granite 4's Mamba2, or ran on)."""
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf")).eval()
    with pytest.raises(ValueError, match="cannot run static: its convolution / SSM / linear-attention layers"):
        model.generate(m, [3, 4, 5], 2, graphs=True)
    assert len(model.generate(m, [3, 4, 5], 2, graphs=None)) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph capture")
def test_a_failed_capture_leaves_the_process_usable(tmp_path, monkeypatch):
    """A decode step that fails inside its CUDA graph capture (a host read made only while capturing: the warm-up
    passes) runs eagerly with the same tokens, and the process goes on: the stream is the one before, and random
    ops work (torch leaves the RNG in capture mode when ending a failed capture raises; the H100 saw it)."""
    make_hf_model("llama", tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"), dtype=torch.bfloat16, device="cuda").eval()
    prompt = [3 + i % 117 for i in range(20)]
    want, run = model.generate(m, prompt, 6), model.Decoding.run
    monkeypatch.setattr(model.Decoding, "run", lambda self, span: (
        torch.cuda.is_current_stream_capturing() and int(self.cache.at), run(self, span))[1])
    stream = torch.cuda.current_stream()
    assert model.generate(m, prompt, 6, graphs=True) == want
    assert torch.cuda.current_stream() == stream
    assert F.dropout(torch.ones(64, device="cuda"), 0.5).sum() > 0 and torch.randint(9, (4,), device="cuda").numel()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "llama4_text", "deepseek_v3"])
def test_attention_takes_sdpa_outputs_in_cuda_layout(arch, tmp_path, monkeypatch):
    """CUDA's SDPA kernels may return [B, H, T, D] laid out as [B, T, H, D] in memory. With it, a padded batch
    (GQA's mask folded into the heads; sliding, chunked and latent attention) gives the same logits and gradients;
    a view of that output fails (it did on the H100)."""
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"))
    ids = torch.randint(3, 120, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0

    def run():
        m.zero_grad()
        h = m(ids, attention_mask=mask)
        (h * mask[..., None]).square().sum().backward()
        return h.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]
    want = run()
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2))
    got = run()
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_gemma3_vision_language_checkpoint_loads_its_text_tower(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (text under language_model., a vision tower beside it) loads
    as the text model: logits equal transformers' on text input; the vision tensors are left out."""
    import transformers
    from conftest import TINY
    text = transformers.Gemma3TextConfig(**{**TINY, **ARCH_CONFIGS["gemma3"][1]})
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                    image_token_index=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(str(tmp_path))
    m = formats.load_model(str(tmp_path))
    assert m.config.model_type == "gemma3_text" and m.config.layer_types == text.layer_types
    ids, mask = padded_batch(120)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = m.logits(m(ids, attention_mask=mask))
    assert (ref - ours)[mask.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["qwen3_5_text", "qwen3_5_moe_text"])
def test_qwen3_5_vision_language_checkpoint_loads_its_text_tower(arch, tmp_path):
    """A Qwen3.5 (-MoE) ForConditionalGeneration checkpoint (text under model.language_model., a vision tower
    beside it) loads as the text model: logits equal transformers' on a padded text batch."""
    import transformers
    from conftest import TINY
    cls, extra = ARCH_CONFIGS[arch]
    text = getattr(transformers, cls)(**{**TINY, **extra})
    vl = "Qwen3_5Moe" if "moe" in arch else "Qwen3_5"
    vision = getattr(transformers, f"{vl}VisionConfig")(depth=1, hidden_size=32, intermediate_size=40, num_heads=2,
                                                       out_hidden_size=64, patch_size=4)
    cfg = getattr(transformers, f"{vl}Config")(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                              image_token_id=127, video_token_id=126, vision_start_token_id=125,
                                              vision_end_token_id=124)
    torch.manual_seed(0)
    hf = getattr(transformers, f"{vl}ForConditionalGeneration")(cfg).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith(("bias", "A_log", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(str(tmp_path))
    m = formats.load_model(str(tmp_path))
    assert m.config.model_type == arch and m.config.layer_types == text.layer_types
    ids, mask = padded_batch(120)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = m.logits(m(ids, attention_mask=mask))
    assert (ref - ours)[mask.bool()].abs().max() < 1e-4


def test_mistral3_vision_language_checkpoint_with_a_mistral4_text_tower(tmp_path):
    """A Mistral3ForConditionalGeneration checkpoint whose text tower is Mistral 4 (as Mistral Small 4 ships) loads as
    mistral4, not as the Ministral 3 text tower a mistral3 config usually holds: logits equal transformers'."""
    import transformers
    from conftest import TINY, auto_register
    auto_register()
    text = transformers.Mistral4Config(**{**TINY, **ARCH_CONFIGS["mistral4"][1]})
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=16, patch_size=4)
    cfg = transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=127)
    torch.manual_seed(0)
    hf = transformers.Mistral3ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(str(tmp_path))
    m = formats.load_model(str(tmp_path))
    assert m.config.model_type == "mistral4"
    ids, mask = padded_batch(120)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = m.logits(m(ids, attention_mask=mask))
    assert (ref - ours)[mask.bool()].abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention runs on CUDA only")
@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_rows_through_varlen_equal_the_mask(arch, tmp_path, monkeypatch):
    """Whole rows longer than the window go through flash varlen attention with a window (no [B, 1, T, S] mask);
    the hidden states and gradients equal the masked SDPA path's."""
    make_hf_model(arch, tmp_path / "hf")
    m = formats.load_model(str(tmp_path / "hf"), dtype=torch.bfloat16, device="cuda").train()
    ids = torch.randint(3, 128, (3, 16), device="cuda")
    calls, varlen = [], kernels.varlen_attention
    monkeypatch.setattr(kernels, "varlen_attention", lambda *a: calls.append(1) or varlen(*a))
    out = []
    for usable in (True, False):
        if not usable:
            monkeypatch.setattr(kernels, "varlen_usable", lambda *a: False)
        m.zero_grad()
        h = m(ids)
        h.float().square().sum().backward()
        out.append((h.float(), torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])))
    if "window_size" in kernels._varlen()[1]:  # torch's varlen_attn takes a window from 2.10 on
        assert calls, "the sliding window did not go through varlen attention"
    (h1, g1), (h2, g2) = out
    assert (h1 - h2).abs().max() <= 3e-2 * h2.abs().max() and (g1 - g2).abs().max() <= 3e-2 * g2.abs().max()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_moe_routing_ties_are_broken_as_transformers_breaks_them(arch, tmp_path):
    """Router rows made equal in pairs (so every token's probabilities tie exactly): nanotune picks the experts
    transformers picks (logits within 1e-4, fp32), the same on every run; with every expert tied, the grouped
    path (tokens sorted by expert, stably) agrees with the per-expert loop."""
    hf = make_hf_model(arch, tmp_path / "hf")
    with torch.no_grad():
        for layer in hf.model.layers:
            router = getattr(layer.mlp, "router", None) or layer.mlp.gate  # (gpt-oss: a router with a bias)
            for w in [router.weight] + ([router.bias] if hasattr(router, "bias") else []):
                w[1::2] = w[0::2]  # experts 2i and 2i+1 always tie
        hf.save_pretrained(tmp_path / "tied")
    m = formats.load_model(str(tmp_path / "tied"))
    ids = torch.randint(3, 128, (3, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours = [m.logits(m(ids)) for _ in range(2)]
    assert (ours[0] - ref).abs().max() < 1e-4 and torch.equal(ours[0], ours[1])
    x, E = torch.randn(40, m.config.hidden_size), m.config.num_experts
    idx = torch.topk(torch.ones(40, E), 2, dim=-1).indices  # every expert tied: the same pick for every row
    w, mlp = torch.full((40, 2), 0.5), m.model.layers[0].mlp.experts
    got = kernels.moe_experts_grouped(x, idx, w, mlp.gate_up_proj, mlp.down_proj, "silu")
    assert (got - kernels.moe_experts_ref(x, idx, w, mlp.gate_up_proj, mlp.down_proj, "silu")).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "olmoe"])
def test_moe_aux_loss_equals_transformers_and_its_gradient_is_exact(arch, tmp_path):
    """The load-balancing loss equals transformers' aux_loss (output_router_logits); the gradient a training step
    takes from loss + coef * n * aux equals autograd of that sum written out from the router logits, with block
    checkpointing (whose recompute adds the aux gradient in backward) and without."""
    import train
    from data import IGNORE
    hf = make_hf_model(arch, tmp_path / "hf")
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_router_logits=True).aux_loss
    m = formats.load_model(str(tmp_path / "hf"))
    m.config.router_aux_loss_coef = coef = 0.3
    with torch.no_grad():
        m(ids)
    assert abs(m.router_aux()[0] - ref) < 1e-6
    import lora
    lora.apply_lora(m, r=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            for _, b in layer.pairs():
                b.normal_(0, 0.05)
    m.train()
    batch = {"input_ids": ids, "labels": ids.masked_fill(ids < 10, IGNORE)}
    n, norm = train.n_trained(batch), 7.0

    def grads():
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])
    logits = []  # the reference: every router's logits kept with their graph, the loss written out
    hooks = [mod.gate.register_forward_hook(lambda _, __, out: logits.append(out)) for mod in m.modules()
             if isinstance(mod, MoE)]
    m.zero_grad()
    ce = train.token_loss_sum(m, batch)
    for h in hooks:
        h.remove()
    E, k = m.config.num_experts, m.config.num_experts_per_tok
    probs = [F.softmax(z.float(), -1) for z in logits]
    counts = sum(torch.zeros(E).scatter_add_(0, p.topk(k, -1).indices.flatten(), torch.ones(p.shape[0] * k))
                 for p in probs)
    rows = sum(p.shape[0] for p in probs)
    aux = E * ((counts / rows) * (sum(p.sum(0) for p in probs) / rows)).sum()
    ((ce + coef * n * aux) / norm).backward()
    want = grads()
    for ckpt in (False, True):
        memory.checkpoint_blocks(m, ckpt)
        m.zero_grad()
        train.backward(train.SFT(), m, batch, norm)
        assert (grads() - want).abs().max() <= 1e-5 * want.abs().max(), ckpt


def test_gpt_oss_gradients_equal_transformers(tmp_path):
    """gpt-oss's backward: every parameter's gradient (the sinks, the router's bias, the experts' biases and their
    interleaved input-major weights turned into nanotune's layout) equals transformers' autograd."""
    from names import experts_from_checkpoint, nanotune_name
    hf = make_hf_model("gpt_oss", tmp_path).train()
    m = formats.load_model(str(tmp_path)).train()
    ids, mask = padded_batch(m.config.vocab_size)
    hf(input_ids=ids, attention_mask=mask).logits[mask.bool()].logsumexp(-1).sum().backward()
    m.logits(m(ids, attention_mask=mask))[mask.bool()].logsumexp(-1).sum().backward()
    ours = dict(m.named_parameters())
    for n, p in hf.named_parameters():
        name = nanotune_name(m.config, n)
        ref = experts_from_checkpoint(m.config, name, p.grad)
        assert (ref - ours[name].grad).abs().max() <= 1e-4 * ref.abs().max(), n
    assert ours["model.layers.0.self_attn.sinks"].grad.abs().min() > 0


def test_the_checkpoints_dropouts_train_and_recompute_exactly(tmp_path):
    """A checkpoint's own dropouts (StarCoder2's attention, residual and embedding dropout; Phi-2's resid_pdrop /
    embd_pdrop) are read and written back; in eval they are off (logits = transformers'), in training on; a
    checkpointed block's recompute draws the masks the forward drew (its gradients equal the plain run's)."""
    from families import config_from_hf, config_to_hf
    hf = make_hf_model("starcoder2", tmp_path / "hf", attention_dropout=0.2, residual_dropout=0.3,
                       embedding_dropout=0.1)
    m = formats.load_model(str(tmp_path / "hf"))
    c = m.config
    assert (c.attention_dropout, c.residual_dropout, c.embedding_dropout) == (0.2, 0.3, 0.1)
    assert config_from_hf(config_to_hf(c)) == c
    phi = config_from_hf({**config_to_hf(c), "model_type": "phi", "sliding_window": None, "resid_pdrop": 0.1,
                          "embd_pdrop": 0.05})
    assert (phi.residual_dropout, phi.embedding_dropout) == (0.1, 0.05)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        assert (m.eval().logits(m(ids)) - hf(ids).logits).abs().max() < 1e-4
        m.train()
        torch.manual_seed(1)
        a = m.logits(m(ids))
        torch.manual_seed(2)
        assert (m.logits(m(ids)) - a).abs().max() > 1e-2  # masks drawn in training
    grads = []
    for ckpt in (False, True):
        memory.checkpoint_blocks(m, ckpt)
        m.zero_grad()
        torch.manual_seed(3)
        m.logits(m(ids)).float().logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()


@pytest.mark.parametrize("heads", [1, 4, 5, 6, 12, 71])
def test_alibi_slopes_equal_transformers_mpt(heads):
    """ALiBi's per-head slopes (kernels.alibi_slopes) equal MPT's in transformers, powers of 2 and the rest."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    want = -build_mpt_alibi_tensor(heads, 2)[:, 0, 0]  # [H, 1, 2] = slope * (-1, 0)
    assert torch.allclose(kernels.alibi_slopes(heads), want.float(), rtol=0, atol=1e-7)
