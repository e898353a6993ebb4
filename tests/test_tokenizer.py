"""tokenizer.model (SentencePiece BPE) rebuilt as a `tokenizers` BPE gives SentencePiece's own ids."""
import pytest

import formats

CORPUS = ("The quick brown fox jumps over the lazy dog. " * 3 + "Fine-tuning language models is fun; "
          "tokenizers split text into pieces. Numbers like 12345 and 3.14 appear too.\n") * 40


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama 2
    return d


@pytest.mark.parametrize("text", ["The lazy fox", "  two  spaces", "unseen: Zürich ✨ 東京",
                                  "12345 tokens\nnew line"])
def test_sentencepiece_rebuild_matches_sentencepiece(spm_dir, text):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tok = formats.load_tokenizer(str(spm_dir))  # a directory with only tokenizer.model: bos added, as Llama 2 does
    assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_gemma3_template_renders_like_transformers_and_trains_each_turns_end(tmp_path):
    """A Gemma 3 checkpoint without a chat template gets the family's: Gemma's turns, the system prompt folded into
    the first user turn, exactly as transformers renders it; each model turn trains through its <end_of_turn>,
    and the Ollama Modelfile stops there."""
    from conftest import make_hf_model, save_tiny_tokenizer
    from transformers import AutoTokenizer
    import data
    import export
    from data import IGNORE
    make_hf_model("gemma3", tmp_path)
    save_tiny_tokenizer(tmp_path, template="", extra_specials=["<start_of_turn>", "<end_of_turn>"])
    tok = formats.load_tokenizer(str(tmp_path))
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France? "},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
            {"role": "assistant", "content": "Madrid."}]
    want = ("<s><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis."
            "<end_of_turn>\n<start_of_turn>user\nAnd Spain?<end_of_turn>\n<start_of_turn>model\nMadrid.<end_of_turn>\n")
    assert tok.render(conv) == want
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for msgs, gen in ((conv, False), (conv[:2], True), (conv[1:4], True)):
        assert tok.render(msgs, add_generation_prompt=gen) == ref.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen, chat_template=tok.chat_template)
    ids, labels = data.tokenize({"messages": conv}, "messages", tok, where="test")
    runs, cur = [], []
    for t, y in zip(ids, labels):
        if y != IGNORE:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    assert [tok.decode(r, skip_special_tokens=False) for r in runs + ([cur] if cur else [])] == [
        "Paris.<end_of_turn>", "Madrid.<end_of_turn>"]
    text = export.ollama_modelfile(str(tmp_path / "m.gguf"), tok)
    assert 'PARAMETER stop "<end_of_turn>"' in text and "<start_of_turn>model" in text
    assert tok.token_id("<end_of_turn>") in tok.stop_ids


HOSTILE_TEMPLATES = {  # what a downloaded chat template could do to hang or exhaust a run -> the sentence
    "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}": "stopped at 1,000,000 steps",
    "{% set s = 'ab' * 100000 %}{% for c in s %}{% for d in s %}{% endfor %}{% endfor %}": "stopped at 1,000,000 steps",
    "{{ 'x' * 10**10 }}": "stopped at 64,000,000 characters",
    "{% for a in range(99999) %}{{ 'y' * 99999 }}{% endfor %}": "stopped at 64,000,000 characters",
    "{% include 'secrets.txt' %}": "uses include, import or extends",
    "{% import 'macros.j2' as m %}": "uses include, import or extends",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}": "recurses without end",
}


@pytest.mark.parametrize("template", list(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_stops_in_one_sentence(template):
    """Rendering is bounded (steps, characters, time per render): a template that would hang or fill memory ends
    in one sentence naming it, as does one that asks for files; real templates render as before."""
    import time
    from cli import NanotuneError
    from tokenizer import CHATML, render_chat_template
    t0 = time.monotonic()
    with pytest.raises(NanotuneError, match=HOSTILE_TEMPLATES[template]) as e:
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 10 and "the chat template starting" in str(e.value)
    assert render_chat_template(CHATML, [{"role": "user", "content": "hi"}], True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_generation_tags_render_like_transformers_and_turn_markers_stop(tmp_path):
    """transformers' {% generation %} block (SmolLM3's template marks the assistant's text with it) renders as its
    body, as apply_chat_template does; the 2026 families' end-of-turn markers stop generation and end trained
    turns (a tokenizer that has the marker gets its id among stop_ids)."""
    from transformers.utils import chat_template_utils as ctu

    import tokenizer
    tpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
           "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "?"}]
    want = ctu.render_jinja_template(conversations=[msgs], chat_template=tpl, add_generation_prompt=True)[0][0]
    assert tokenizer.render_chat_template(tpl, msgs, add_generation_prompt=True) == want
    from conftest import save_tiny_tokenizer
    markers = ["<turn|>", "<|eot|>", "<|END_OF_TURN_TOKEN|>", "[|endofturn|]", "<seed:eos>", "<|return|>"]
    save_tiny_tokenizer(tmp_path, extra_specials=markers)
    tok = formats.load_tokenizer(str(tmp_path))
    assert {tok.token_id(m) for m in markers} <= tok.stop_ids
