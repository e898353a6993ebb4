"""Label masks, golden per format: exactly which text carries loss (SmolLM2's real tokenizer and template)."""
import json

import pytest

import data
import tokenizer
from data import IGNORE
from cli import NanotuneError


@pytest.fixture(scope="module")
def tok(_smollm_tokenizer):
    import copy
    return copy.deepcopy(_smollm_tokenizer)


def trained(tok, ids, labels):
    """The trained runs of a sample, decoded with specials visible."""
    runs, cur = [], []
    for t, y in zip(ids, labels):
        if y != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def one(tok, rec, **kw):
    fmt = kw.pop("fmt", None) or data.detect_format(rec, "test")
    ids, labels = data.tokenize(rec, fmt, tok, where="test", **kw)
    assert len(ids) == len(labels)
    return ids, labels


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Madrid."}]


def test_messages_train_every_assistant_turn_with_its_end_of_turn(tok):
    ids, labels = one(tok, {"messages": CONV})
    assert trained(tok, ids, labels) == ["Paris.<|im_end|>", "Madrid.<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == tok.render(CONV)


def test_roles_to_train_picks_roles(tok):
    ids, labels = one(tok, {"messages": CONV}, roles=("user",))
    assert trained(tok, ids, labels) == ["<|im_start|>user\nCapital of France?<|im_end|>",
                                         "<|im_start|>user\nAnd Spain?<|im_end|>"]


def test_train_on_inputs_trains_everything(tok):
    ids, labels = one(tok, {"messages": CONV}, train_on_inputs=True)
    assert labels == ids


def test_sharegpt(tok):
    rec = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    ids, labels = one(tok, rec)
    assert trained(tok, ids, labels) == ["Hello!<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)  # the model's template's default system


def test_alpaca_with_input_and_system(tok):
    rec = {"system": "Translate.", "instruction": "To French:", "input": "cat", "output": "chat"}
    ids, labels = one(tok, rec)
    text = tok.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>system\nTranslate.<|im_end|>" in text and "To French:\n\ncat" in text
    assert trained(tok, ids, labels) == ["chat<|im_end|>"]


def test_end_of_turn_that_is_not_eos_is_trained(tok):
    """Llama-3 style turns end in <|eot_id|>, not the tokenizer's eos; the marker still carries loss."""
    ids, labels = one(tok, {"messages": CONV[1:3]}, template=tokenizer.BUILTIN_TEMPLATES["llama3"])
    assert trained(tok, ids, labels) == ["Paris.<|eot_id|>"]
    assert tok.eos_token != "<|eot_id|>"


def test_completion_trains_all_and_appends_eos(tok):
    ids, labels = one(tok, {"text": "Once upon a time"})
    assert labels == ids and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "Once upon a time"


def test_segments_follow_their_label(tok):
    rec = {"segments": [{"text": "Q: 2+2?\n", "label": False}, {"text": "A: 4", "label": True}]}
    ids, labels = one(tok, rec)
    assert trained(tok, ids, labels) == ["A: 4"]


def test_tokenized_passes_through(tok):
    ids, labels = one(tok, {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]})
    assert ids == [5, 6, 7] and labels == [-100, 6, 7]


def test_mixing_weights_and_truncation(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"sample number {i} " * (1 + 10 * (i == 0))}) for i in range(10)))
    half, _ = data.build_dataset([f"{f}:0.5"], tok, max_len=64)
    twice, _ = data.build_dataset([{"path": str(f), "weight": 2.0}], tok, max_len=64)
    assert len(half) == 5 and len(twice) == 20
    dropped, stats = data.build_dataset([str(f)], tok, max_len=12, truncation="drop")
    assert stats["dropped_too_long"] == 1 and len(dropped) == 9
    cut, stats = data.build_dataset([str(f)], tok, max_len=12, truncation="truncate")
    assert stats["truncated"] == 1 and max(len(s["input_ids"]) for s in cut) == 12


def test_samples_that_train_nothing_are_dropped_with_a_warning(tok, tmp_path, capsys):
    """The run doctor's data check: conversations where no turn of roles_to_train is left (here 2 of 5 without an
    assistant turn) are dropped and counted in one warning line naming what to check."""
    f = tmp_path / "d.jsonl"
    rows = [[{"role": "user", "content": f"q{i}"}] + ([{"role": "assistant", "content": f"a{i}"}] if i % 2 == 0
                                                      else []) for i in range(5)]
    f.write_text("\n".join(json.dumps({"messages": m}) for m in rows))
    kept, stats = data.build_dataset([str(f)], tok, max_len=64)
    assert len(kept) == 3 and stats["dropped_untrained"] == 2
    assert "warning: 2 of 5 samples train no token and were dropped" in capsys.readouterr().err


def test_the_doctor_counts_trained_tokens_by_role_and_names_turns_that_never_stop(tok, tmp_path):
    """The run doctor's data lines: trained tokens by role (assistant only by default; the tool role too when
    trained), silent with ChatML (every turn ends in <|im_end|>); a template that writes no end-of-turn marker gets a
    warning naming the fix; turns that max_len cuts before their marker get theirs."""
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"messages": CONV + [{"role": "tool", "content": "{}"}]}) for _ in range(3)))
    _, stats = data.build_dataset([str(f)], tok, max_len=256)
    lines = data.doctor(stats)
    assert stats["trained_by_role"] == {"assistant": stats["trained_tokens"]} and stats["turns"] == 6
    assert lines == [f"data: trained tokens by role: assistant {stats['trained_tokens']:,} (100.0%)"]
    per_answer = len(tok.encode("Paris.<|im_end|>", add_special_tokens=False))
    _, stats = data.build_dataset([str(f)], tok, max_len=256, roles=("assistant", "tool"))
    assert stats["trained_by_role"]["tool"] > 0 and stats["trained_by_role"]["assistant"] == 3 * (
        per_answer + len(tok.encode("Madrid.<|im_end|>", add_special_tokens=False)))
    bare = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}" \
           "assistant: {% endif %}"
    _, stats = data.build_dataset([str(f)], tok, max_len=256, chat_template=bare)
    (warn,) = [ln for ln in data.doctor(stats) if ln.startswith("warning")]
    assert stats["turns_without_end"] == 6 and warn.startswith("warning: 6 of 6 trained turns end without an "
                                                                  "end-of-turn token")
    _, stats = data.build_dataset([str(f)], tok, max_len=39)  # (the second answer: tokens 37 .. 40)
    assert stats["turns_cut"] == 3 and "cut by max_len" in data.doctor(stats)[-1]


def test_packing_rows_and_efficiency():
    samples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 4, 3, 6)]
    rows, eff = data.pack(samples, 10)
    assert [len(r["input_ids"]) for r in rows] == [9, 9]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert rows[0]["labels"][5] == IGNORE  # a sample's first token is never predicted from the previous sample
    assert eff == pytest.approx(18 / 20)


def test_sampler_is_deterministic_and_resumable():
    a = data.Sampler(10, 3, seed=7)
    seq = [a.next() for _ in range(6)]
    b = data.Sampler(10, 3, seed=7)
    for _ in range(2):
        b.next()
    c = data.Sampler(10, 3, seed=7)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(4)] == seq[2:]
    assert sorted(sum(seq[:4], [])) == list(range(10))  # one epoch covers every sample once


@pytest.mark.parametrize("content,expect", [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n', "bad.jsonl:2: not valid JSON"),
    ('{"instruction": "hi"}\n', "bad.jsonl:1: record has no 'output'"),
    ("", "has no records"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}\n', "no sample in"),
])
def test_bad_data_is_named(tok, tmp_path, content, expect):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(NanotuneError, match=expect.replace("(", r"\(").replace("+", r"\+")):
        data.build_dataset([str(f)], tok)
