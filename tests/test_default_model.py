"""The default model, SmolLM2-135M-Instruct from its Q4_1 GGUF: logits, tokenizer and chat template
against transformers reading the same file, and a coherent greedy answer."""
import os

import pytest
import torch

import formats
import model

pytestmark = pytest.mark.slow  # the 135M model against transformers reading its GGUF (~35 s)

TEXTS = ["Hello world", "  leading   and trailing runs   \n\n\tof whitespace  ",
         "digits 1234567 and 3.14159, 2026-11-29", "accents: café, naïve, Ångström, jalapeño",
         "CJK: 東京は日本の首都です。你好，世界", "emoji: 🤗🚀 👩‍💻 ✨",
         "<|im_start|>user\nspecial tokens inline<|im_end|>", "code:\n    def f(x):\n        return x**2  # ok"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "How are you?"}],
]


@pytest.fixture(scope="module")
def ours(smollm_gguf):
    return formats.load(smollm_gguf)


@pytest.fixture(scope="module")
def hf_tok(smollm_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(smollm_gguf), gguf_file=os.path.basename(smollm_gguf))


def test_logits_match_transformers_gguf(smollm_gguf, ours):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm_gguf), gguf_file=os.path.basename(smollm_gguf),
                                              dtype=torch.float32).eval()
    m, tok = ours
    ids = torch.tensor([tok.chat(CONVERSATIONS[1])])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = m.logits(m(ids))
    err = (ref - got).abs().max().item()
    assert err < 1e-3, f"max |logits - transformers| = {err}"


def test_greedy_chat_answer_is_coherent(ours):
    m, tok = ours
    out = model.generate(m, tok.chat([{"role": "user", "content": "What is the capital of France?"}]),
                      max_new_tokens=30, stop_ids=tok.stop_ids)
    text = tok.decode(out)
    assert "Paris" in text, text
    assert out[-1] in tok.stop_ids  # it ends its turn by itself


def test_kv_cache_equals_recompute_on_default_model(ours):
    m, tok = ours
    prompt = tok.chat([{"role": "user", "content": "Name three colours."}])
    assert model.generate(m, prompt, 16, use_cache=True) == model.generate(m, prompt, 16, use_cache=False)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_ids_equal_transformers(ours, hf_tok, text):
    tok = ours[1]
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_tokenizer_json_roundtrip_equals_transformers(ours, hf_tok, tmp_path):
    """tokenizer.json + tokenizer_config.json as transformers writes them load into nanotune unchanged."""
    from transformers import AutoTokenizer
    hf_tok.save_pretrained(tmp_path)
    tok = formats.load_tokenizer(str(tmp_path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert tok.encode(text) == ref(text)["input_ids"], text
    for conv in CONVERSATIONS:
        assert tok.render(conv, add_generation_prompt=True) == ref.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_equals_transformers(ours, hf_tok, conv, gen):
    tok = ours[1]
    text = tok.render(conv, add_generation_prompt=gen)
    assert text == hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    ids = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.chat(conv, add_generation_prompt=gen) == list(ids)


def test_ggufread_reads_what_ggufs_reader_reads(smollm_gguf):
    """ggufread (nanotune's GGUF reader) against gguf's GGUFReader on the default model's file: every key's value
    and type, every tensor's name, type, shape and bytes."""
    from test_export import assert_same_as_ggufs_reader
    assert_same_as_ggufs_reader(smollm_gguf)
