"""nanotune data: records on disk -> (input_ids, labels) samples -> packed or padded micro-batches.

Formats, detected from the first record (override with `type`):
    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   (OpenAI)
    sharegpt   {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
    alpaca     {"instruction": ..., "input": ..., "output": ..., "system"?: ...}
    completion {"text": ...}                                   every token trained, eos appended
    segments   {"segments": [{"text": ..., "label": true|false}, ...]}   trained where label is true
    tokenized  {"input_ids": [...], "labels"?: [...]}          labels -100 where not trained
Conversations are rendered with the chat template (the model's, a built-in name, a file or an inline
Jinja2 string). Loss goes on assistant turns by default, each turn's end-of-turn marker included, so the
model learns to stop. `labels` are -100 where no loss is taken; the shift happens in the loss.

    from data import build_dataset
    samples, stats = build_dataset([{"path": "examples/identity.jsonl"}], tok, max_len=512)
"""
import hashlib
import json
import math
import os
import random
import re
import sys

import torch

from cli import NanotuneError, publish, writing
from tokenizer import END_OF_TURN, resolve_template

IGNORE = -100
FORMATS = ("messages", "sharegpt", "alpaca", "completion", "segments", "tokenized")
ROLES = ("system", "user", "assistant", "tool", "developer")  # roles chat templates render
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "model": "assistant", "bot": "assistant"}


# ---------------------------------------------------------------------------------------------
# Reading
def read_records(path: str) -> list:
    """[(where, record)] from .jsonl / .json / .parquet, or `hf:name[:split]` via the `datasets` package."""
    if path.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise NanotuneError(f"{path}: reading Hugging Face datasets needs `pip install datasets`.")
        name, _, split = path[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        return [(f"{path}[{i}]", dict(r)) for i, r in enumerate(ds)]
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise NanotuneError(f"dataset {path!r} {what}; pass a .jsonl, .json or .parquet file.")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise NanotuneError(f"{path}: reading Parquet needs `pip install pyarrow`.")
        return [(f"{path}[{i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise NanotuneError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); "
                            "save the file as UTF-8.")
    if path.endswith(".json") and text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise NanotuneError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file.")
        except RecursionError:
            raise NanotuneError(f"{path}: nested too deeply to be a dataset; fix the file.")
        data = data.get("data", data) if isinstance(data, dict) else data
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise NanotuneError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line.")
        except RecursionError:
            raise NanotuneError(f"{path}:{n}: nested too deeply to be a record; fix or remove that line.")
    return out


def detect_format(rec, where) -> str:
    if not isinstance(rec, dict):
        raise NanotuneError(f"{where}: a record must be a JSON object, got {type(rec).__name__}.")
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
                     ("segments", "segments"), ("input_ids", "tokenized"), ("text", "completion")):
        if key in rec:
            return fmt
    raise NanotuneError(f"{where}: cannot tell the format from keys {sorted(rec)}; expected messages, conversations, "
                        "instruction/output, segments, input_ids or text (or set the dataset's type).")


def _need(rec, keys, fmt, where):
    for k in keys:
        if k not in rec or rec[k] is None:
            raise NanotuneError(f"{where}: record has no {k!r}; the {fmt} format needs {' and '.join(keys)}.")


def to_messages(rec, fmt, where) -> list:
    if fmt == "messages":
        _need(rec, ["messages"], fmt, where)
        msgs = rec["messages"]
    elif fmt == "sharegpt":
        _need(rec, ["conversations"], fmt, where)
        msgs = []
        for t in rec["conversations"]:
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or "value" not in t:
                raise NanotuneError(f"{where}: each sharegpt turn needs 'from' ({'/'.join(SHAREGPT_ROLES)}) and "
                                    "'value'.")
            msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    else:  # alpaca
        _need(rec, ["instruction", "output"], fmt, where)
        _text(rec, ["instruction", "input", "output", "system"], where)
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        msgs = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise NanotuneError(f"{where}: messages must be a non-empty list of {{'role': str, 'content': str}}.")
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise NanotuneError(f"{where}: message {i} has role {m['role']!r}; use one of {', '.join(ROLES)} "
                                "(or map the role in the data).")
    return msgs


def _text(rec, keys, where):
    """Fields that must be strings when present (a number or a list is no text)."""
    for k in keys:
        if rec.get(k) is not None and not isinstance(rec[k], str):
            raise NanotuneError(f"{where}: {k!r} must be a string, got {type(rec[k]).__name__} {rec[k]!r:.40}.")


# ---------------------------------------------------------------------------------------------
# Tokenizing with label masks
def trained_spans(msgs, render, roles, terminators) -> list:
    """Character spans of the rendered conversation that carry loss: each message of a trained role, from the end
    of its header to just after its end-of-turn marker (the marker is trained, what the template puts after it is
    not), and the rendered text. The header is the generation prompt as far as the rendered turn agrees with it
    (Gemma 4 prompts with an empty thought channel that its rendered turns drop). A template that ends the last
    turn without the marker it writes between turns (Apertus) gets the marker appended: else the model would
    never learn to stop. Relies on the template rendering a conversation's prefix as a prefix."""
    renders = {}

    def prefix(n, gen):  # the first n messages rendered (each prefix once: a turn's end is the next one's start)
        if (n, gen) not in renders:
            renders[n, gen] = render(msgs[:n], gen)
        return renders[n, gen]
    full, spans = prefix(len(msgs), False), []
    for i, m in enumerate(msgs):
        if m["role"] not in roles:
            continue
        before, head = prefix(i, False), prefix(i, m["role"] == "assistant")
        if not full.startswith(before):  # (a conversation that is not continued may end in eos: Phi-3.5-MoE)
            before = next((before[: -len(t)] for t in terminators if t and before.endswith(t)), before)
        start = len(os.path.commonprefix([head, full]))
        if not full.startswith(before) or start < len(before):
            raise NanotuneError("the chat template does not render a conversation's prefix as a prefix, so turns "
                                "cannot be masked; set chat_template to a built-in (chatml, llama3, ...) or a file.")
        body = full.find(m["content"], start)
        after = body + len(m["content"]) if body >= 0 else start
        last = i == len(msgs) - 1
        limit = len(full) if last else max(full.find(msgs[i + 1]["content"], after), after)
        hits = [(full.find(t, after), t) for t in terminators if t and 0 <= full.find(t, after) < limit]
        if not hits and last:  # what the template writes after this turn when another follows
            more = render(msgs + [{"role": "user", "content": "\x01"}], False)
            gap = more[after: more.find("\x01", after)] if more.startswith(full[:after]) else ""
            mark = min(((gap.find(t), t) for t in terminators if t and t in gap), default=None)
            if mark and full[after:] == "":
                full += gap[: mark[0] + len(mark[1])]
                hits = [(after + mark[0], mark[1])]
        upto = prefix(i + 1, False)  # (no marker: the turn as the template ends it)
        end = min(hits)[0] + len(min(hits)[1]) if hits else len(upto) if full.startswith(upto) else after
        spans.append((start, end, m["role"], bool(hits)))  # (whether the turn ends in an end-of-turn marker)
    return spans, full


def tokenize(rec, fmt, tok, template=None, roles=("assistant",), train_on_inputs=False, where="", turns=None) -> tuple:
    """One record -> (input_ids, labels). `turns`, a list: gets (role, first token, end token, ends in an
    end-of-turn marker) for each trained turn of a conversation (the run doctor's data)."""
    if fmt in ("messages", "sharegpt", "alpaca"):
        msgs = to_messages(rec, fmt, where)
        render = lambda ms, gen: tok.render(ms, add_generation_prompt=gen, template=template)  # noqa: E731
        terminators = list(END_OF_TURN) + [tok.eos_token]
        spans, text = trained_spans(msgs, render, set(roles), terminators)
        enc = tok.backend.encode(text, add_special_tokens=False)
        ids, keep = enc.ids, [train_on_inputs] * len(enc.ids)
        for s, e, role, ended in spans:
            # a token is trained when it overlaps a trained span: one that joins the header's last character
            # to the answer's first (BPE merges "\n" + " " of an answer starting with two spaces) is the answer's
            mine = [i for i, (a, b) in enumerate(enc.offsets) if ((s < b and a < e) if b > a else s <= a < e)]
            for i in mine:
                keep[i] = True
            if turns is not None and mine:
                turns.append((role, mine[0], mine[-1] + 1, ended))
        return ids, [t if k else IGNORE for t, k in zip(ids, keep)]
    if fmt == "completion":
        _need(rec, ["text"], fmt, where)
        _text(rec, ["text"], where)
        ids = tok.encode(rec["text"]) + ([tok.eos_id] if tok.eos_id is not None and not tok.add_eos else [])
        return ids, list(ids)
    if fmt == "segments":
        _need(rec, ["segments"], fmt, where)
        ids, labels = ([tok.bos_id], [IGNORE]) if tok.add_bos else ([], [])
        for s in rec["segments"]:
            if not isinstance(s, dict) or not isinstance(s.get("text"), str):
                raise NanotuneError(f"{where}: each segment needs a string 'text' (and 'label': true/false).")
            if not isinstance(s.get("label", True), bool):  # ("no" would count as true)
                raise NanotuneError(f"{where}: a segment's 'label' must be true or false, got {s['label']!r}.")
            part = tok.encode(s["text"], add_special_tokens=False)
            ids += part
            labels += part if (s.get("label", True) or train_on_inputs) else [IGNORE] * len(part)
        return ids, labels
    if fmt == "tokenized":
        _need(rec, ["input_ids"], fmt, where)
        ids, labels = rec["input_ids"], rec.get("labels") or rec["input_ids"]
        V = tok.vocab_size
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < V for t in ids):
            raise NanotuneError(f"{where}: input_ids must be a list of token ids in [0, {V}) (the tokenizer's vocab "
                                "size); tokenize with this model's tokenizer.")
        if not isinstance(labels, list) or not all(type(t) is int and (t == IGNORE or 0 <= t < V) for t in labels):
            raise NanotuneError(f"{where}: labels must be token ids in [0, {V}) or {IGNORE} (no loss).")
        if len(labels) != len(ids):
            raise NanotuneError(f"{where}: input_ids and labels have different lengths ({len(ids)} vs {len(labels)}).")
        return list(ids), list(labels)
    raise NanotuneError(f"{where}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")


# ---------------------------------------------------------------------------------------------
# Datasets: mixing, truncation, caching
def _cache_key(spec, tok, settings) -> str:
    h = hashlib.sha256()
    p = spec["path"]
    st = os.stat(p) if os.path.isfile(p) else None
    h.update(json.dumps([spec, settings, st and (st.st_size, st.st_mtime_ns)], sort_keys=True, default=str).encode())
    h.update(tok.backend.to_str().encode())
    h.update(json.dumps([tok.bos_token, tok.eos_token, tok.add_bos, tok.add_eos, tok.chat_template]).encode())
    return h.hexdigest()[:24]


def tokenize_dataset(spec, tok, template, roles, train_on_inputs, cache_dir=None) -> list:
    """All records of one dataset -> [{"input_ids", "labels", "where"}], cached on disk when cache_dir is set."""
    settings = dict(template=template, roles=list(roles), train_on_inputs=train_on_inputs, type=spec.get("type"),
                    turns=1)  # (turns=1: samples carry their turns; older caches are rebuilt)
    path = os.path.join(cache_dir, _cache_key(spec, tok, settings) + ".pt") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a corrupt or foreign cache file: tokenize again and replace it
            print(f"warning: the tokenized cache {path} could not be read; rebuilding it.", file=sys.stderr)
    records = read_records(spec["path"])
    if not records:
        raise NanotuneError(f"dataset {spec['path']} has no records; add some or remove it from the config.")
    fmt = spec.get("type") or detect_format(records[0][1], records[0][0])  # (a given type: dataset_spec checked it)
    out = []
    for where, rec in records:
        turns = []
        ids, labels = tokenize(rec, fmt, tok, template, roles, train_on_inputs, where, turns)
        out.append({"input_ids": ids, "labels": labels, "where": where, "turns": turns})
    if path:  # (a cache: a disk too full to hold it costs only the next run's tokenizing)
        os.makedirs(cache_dir, exist_ok=True)
        try:
            with writing(path, path + ".tmp"):
                torch.save(out, path + ".tmp")
            publish(path + ".tmp", path)
        except NanotuneError as e:
            print(f"warning: {e} The run goes on without caching the tokenized data.", file=sys.stderr)
    return out


def read_prompts(path) -> list:
    """The held-out prompts in `path`, one per line ('' or None: none); a file that is missing, a directory or
    not UTF-8 is one sentence."""
    if not path:
        return []
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise NanotuneError(f"sample_prompts_file {path!r} {what}; pass a file with one prompt per line, or '' for "
                            "none.")
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError:
        raise NanotuneError(f"sample_prompts_file {path!r} is not UTF-8 text; save it as UTF-8.")


def check_inputs(cfg):
    """Every file a run reads exists and every dataset entry is well formed (before the model loads)."""
    for spec in [*cfg.datasets, *([cfg.eval_file] if cfg.eval_file else [])]:
        dataset_spec(spec)
    read_prompts(cfg.sample_prompts_file)
    resolve_template(cfg.chat_template)


def dataset_spec(spec) -> dict:
    """"file.jsonl", "file.jsonl:0.5" (a weight) or {"path", "type"?, "weight"?} -> the dict form, checked:
    the file exists, the type is a format, the weight is a number > 0."""
    if isinstance(spec, str):
        path, _, w = spec.rpartition(":")
        spec = {"path": path, "weight": float(w)} if path and re.fullmatch(r"\d+(\.\d*)?", w) else {"path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise NanotuneError(f"dataset entry {spec!r} needs a 'path' (a file, or hf:name); see README 'Data'.")
    unknown = sorted(set(spec) - {"path", "type", "weight"})
    if unknown:
        raise NanotuneError(f"dataset {spec['path']}: unknown key {unknown[0]!r}; an entry has path, type, weight.")
    if spec.get("type") is not None and spec["type"] not in FORMATS:
        raise NanotuneError(f"dataset {spec['path']}: type {spec['type']!r} is not one of {', '.join(FORMATS)}.")
    w = spec.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
        raise NanotuneError(f"dataset {spec['path']}: weight {w!r} must be a number > 0.")
    if not spec["path"].startswith("hf:") and not os.path.isfile(spec["path"]):
        what = "is a directory" if os.path.isdir(spec["path"]) else "does not exist"
        raise NanotuneError(f"dataset {spec['path']!r} {what}; pass a .jsonl, .json or .parquet file.")
    return spec


def mix(samples, weight: float, rng: random.Random) -> list:
    """weight 2.0 repeats every sample twice, 0.5 keeps a seeded half, 1.5 all once plus a seeded half."""
    whole, frac = int(weight), weight - int(weight)
    out = samples * whole
    if frac > 0:
        out += rng.sample(samples, round(frac * len(samples)))
    return out


def build_dataset(specs, tok, max_len=2048, truncation="truncate", chat_template=None, roles=("assistant",),
                  train_on_inputs=False, seed=0, cache_dir=None) -> tuple:
    """specs: [{"path", "type"?, "weight"?}] -> (samples, stats). Samples keep their trained tokens;
    over-long ones are truncated or dropped; samples left with no trained token are dropped."""
    template = resolve_template(chat_template)
    rng = random.Random(seed)
    samples, stats = [], {"records": 0, "truncated": 0, "dropped_too_long": 0, "dropped_untrained": 0}
    for spec in map(dataset_spec, specs):
        part = tokenize_dataset(spec, tok, template, roles, train_on_inputs, cache_dir)
        stats["records"] += len(part)
        samples += mix(part, float(spec.get("weight", 1.0)), rng)
    out = []
    for s in samples:
        if len(s["input_ids"]) > max_len:
            if truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            stats["truncated"] += 1
            s = {**s, "input_ids": s["input_ids"][:max_len], "labels": s["labels"][:max_len]}
        if all(t == IGNORE for t in s["labels"][1:]):  # label 0 is never predicted (nothing precedes it)
            stats["dropped_untrained"] += 1
            continue
        out.append(s)
    if not out:
        names = ", ".join(s["path"] if isinstance(s, dict) else s for s in specs)
        raise NanotuneError(f"no sample in {names} has a trainable token (after masking and truncation); check "
                            "roles_to_train / train_on_inputs, the format, or raise max_len.")
    if stats["dropped_untrained"]:  # (the run doctor: a share of the data masked out entirely)
        print(f"warning: {stats['dropped_untrained']} of {stats['dropped_untrained'] + len(out)} samples train no "
              "token and were dropped (no turn of a role in roles_to_train, or its answer truncated away); check "
              "roles_to_train / train_on_inputs and max_len.", file=sys.stderr)
    stats["samples"] = len(out)
    stats["tokens"] = sum(len(s["input_ids"]) for s in out)
    stats["trained_tokens"] = sum(sum(t != IGNORE for t in s["labels"][1:]) for s in out)
    stats.update(turn_stats(out))
    return out, stats


def turn_stats(samples) -> dict:
    """The run doctor's data: trained tokens by role (of the conversations' trained turns; "other" for the rest),
    how many trained turns there are, how many the template ends without an end-of-turn marker, and how many
    max_len cuts before their end."""
    by_role, turns, unended, cut = {}, 0, 0, 0
    for s in samples:
        labels = s["labels"]
        for role, a, b, ended in s.get("turns", ()):
            if a >= len(labels):  # (truncated away entirely)
                continue
            turns, unended, cut = turns + 1, unended + (not ended and b <= len(labels)), cut + (b > len(labels))
            by_role[role] = by_role.get(role, 0) + sum(t != IGNORE for t in labels[max(a, 1):b])
    other = sum(sum(t != IGNORE for t in s["labels"][1:]) for s in samples) - sum(by_role.values())
    return {"trained_by_role": {**by_role, **({"other": other} if other else {})}, "turns": turns,
            "turns_without_end": unended, "turns_cut": cut}


def doctor(stats) -> list:
    """The run doctor's lines on the data, printed before step 1: trained tokens by role, and a warning for trained
    turns that end without an end-of-turn marker (the model would never learn to stop) or are cut before it."""
    by, total = stats.get("trained_by_role", {}), max(1, stats["trained_tokens"])
    lines = ["data: trained tokens by role: " + ", ".join(f"{r} {n:,} ({100 * n / total:.1f}%)" for r, n in by.items())
             ] if by else []
    if stats.get("turns_without_end"):
        lines.append(f"warning: {stats['turns_without_end']} of {stats['turns']} trained turns end without an "
                     "end-of-turn token (the chat template writes none after them), so the model will not learn to "
                     "stop; use a template that ends each turn with a marker (chat_template: chatml, llama3, ...).")
    if stats.get("turns_cut"):
        lines.append(f"warning: {stats['turns_cut']} of {stats['turns']} trained turns are cut by max_len before "
                     "their end-of-turn token, so those answers train no stop; raise max_len or set truncation: drop.")
    return lines


def split_eval(samples, val_set_size, seed):
    """(train, eval): a seeded hold-out of val_set_size (a fraction < 1 or a count) of the samples."""
    if not val_set_size:
        return samples, []
    n = held_out(val_set_size, len(samples))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [samples[i] for i in order[n:]], [samples[i] for i in order[:n]]


def held_out(val_set_size, n):
    """How many of n samples val_set_size (a fraction < 1 or a count) holds out; at least one must be left."""
    k = int(val_set_size if val_set_size >= 1 else round(val_set_size * n))
    if k >= n:
        raise NanotuneError(f"val_set_size {val_set_size:g} holds out {k} of the {n} samples and leaves none to "
                            f"train on; use at most {n - 1}, or a fraction below 1.")
    return k


# ---------------------------------------------------------------------------------------------
# Packing, batching, sampling
def pack(samples, max_len: int) -> tuple:
    """Concatenate samples into rows of at most max_len tokens (in order, greedy). Each row carries
    position_ids restarting at 0 per sample, which the model reads as document boundaries."""
    rows, cur = [], None
    for s in samples:
        n = len(s["input_ids"])
        if cur is None or len(cur["input_ids"]) + n > max_len:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(cur)
        cur["input_ids"] += s["input_ids"]
        cur["labels"] += [IGNORE] + s["labels"][1:]  # never predict a sample's first token from the previous one
        cur["position_ids"] += list(range(n))
    used = sum(len(r["input_ids"]) for r in rows)
    return rows, used / (len(rows) * max_len)


def collate(rows, pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad rows to the longest (or to pad_to): input_ids/labels [B, T], and attention_mask where a row is
    padded (none when every row is whole: causal attention needs no [B, 1, T, T] mask, which long rows could not
    hold), or position_ids for packed rows (padding then forms its own document, which nothing attends to)."""
    T = max(max(len(r["input_ids"]) for r in rows), pad_to or 0)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    packed = "position_ids" in rows[0]
    extra = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        if packed:
            extra[i, :n] = torch.tensor(r["position_ids"])
            extra[i, n:] = torch.arange(T - n)
        else:
            extra[i, :n] = 1
    if not packed and bool(extra.all()):
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


class Sampler:
    """Seeded shuffled order per epoch, consumed in micro-batches; the state (epoch, position) is saved
    with checkpoints so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.pos = 0, 0

    def order(self):
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next(self) -> list:
        """Indices of the next micro-batch (the last one of an epoch may be smaller)."""
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self.order()[self.pos : self.pos + self.batch_size]
        self.pos += len(idx)
        return idx

    def batches_per_epoch(self):
        return math.ceil(self.n / self.batch_size)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, s):
        if s["n"] != self.n:
            raise NanotuneError(f"the checkpoint's dataset had {s['n']} samples, this one has {self.n}; resume with "
                                "the same data and settings.")
        self.epoch, self.pos, self.seed = s["epoch"], s["pos"], s["seed"]
