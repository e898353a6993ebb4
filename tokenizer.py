"""nanotune tokenizer: a `tokenizers` backend built from tokenizer.json, tokenizer.model (SentencePiece) or a
GGUF's embedded vocabulary (and written back into a GGUF), plus what tokenizer_config.json adds (special
tokens, bos/eos policy) and chat templates: rendering in a sandboxed Jinja2 environment, the built-in
templates, their Ollama (Go template) translations and the end-of-turn markers generation stops on.

    from formats import load_tokenizer          # finds the files: a model dir, a .gguf, the default model
    tok = load_tokenizer()
    ids = tok.chat([{"role": "user", "content": "Hi"}])             # the chat template, then encode
    tok.chat_template = resolve_template("llama3")                  # a built-in, a file, or inline Jinja2
"""
import collections
import functools
import json
import os
import sys

from cli import NanotuneError, read_json

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
               "<turn|>", "<|eot|>", "<|eom|>", "<|END_OF_TURN_TOKEN|>", "[|endofturn|]", "<seed:eos>",
               "<|end_of_sentence|>", "<|assistant_end|>", "<|return|>", "<|call|>")  # (Gemma 4, Llama 4, Cohere,
#                          EXAONE 4, Seed-OSS, ERNIE 4.5, Apertus, gpt-oss: the turn markers of their own templates)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# A chat template comes with a downloaded model, so it is untrusted code: it renders in Jinja's sandbox, and within
# bounds (a template that loops or grows without end would otherwise hang training): the lines it executes (a
# trace hook on the template's own compiled code, which sees every loop step), the size of what it writes or
# builds with `*`, and time, all per render.
RENDER_LIMITS = dict(steps=1_000_000, chars=64_000_000, seconds=20.0)


class _RenderBound(Exception):
    pass


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """`template` compiled once (compiling a long template costs more than rendering it) in its own sandboxed
    environment; a render sets env.check, its bounds' counter."""
    from datetime import datetime

    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*"])

        def call_binop(self, context, operator, left, right):
            if operator == "*" and isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple)):
                n, seq = (right, left) if isinstance(left, (str, list, tuple)) else (left, right)
                self.check(chars=len(seq) * n if isinstance(n, int) else 0)
            return super().call_binop(context, operator, left, right)

    def raise_exception(msg):
        raise NanotuneError(f"chat template: {msg}")

    class Generation(Extension):  # transformers' {% generation %} ... {% endgeneration %} (SmolLM3's template marks
        tags = {"generation"}  # the assistant's text with it): rendered as its body

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env, env.from_string(template)


def render_chat_template(template: str, messages: list, add_generation_prompt=False, **kwargs) -> str:
    """Render a Jinja2 chat template in a sandbox, with the globals and filters transformers provides."""
    import time

    from jinja2 import TemplateError

    lim, t0, steps = RENDER_LIMITS, time.monotonic(), [0]

    def check(n_steps=0, chars=0):
        steps[0] += n_steps
        if steps[0] > lim["steps"]:
            raise _RenderBound(f"{lim['steps']:,} steps")
        if chars > lim["chars"]:
            raise _RenderBound(f"{lim['chars']:,} characters")
        if time.monotonic() - t0 > lim["seconds"]:
            raise _RenderBound(f"{lim['seconds']:g} s")

    def trace(frame, event, arg):  # (only the template's frames are traced line by line)
        return step if frame.f_code.co_filename == "<template>" else None

    def step(frame, event, arg):
        if event == "line":
            check(1)
        return step

    where = f"the chat template starting {template[:40]!r}"
    traced = sys.gettrace() is None  # (a debugger's or coverage's hook is left alone)
    try:
        (env, compiled), out, n = _compiled(template), [], 0
        env.check = check
        if traced:
            sys.settrace(trace)
        kwargs = {"tools": None, "documents": None, **kwargs}  # (as transformers passes them: `tools is none`)
        for chunk in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs):
            n += len(chunk)
            check(chars=n)
            out.append(chunk)
        return "".join(out)
    except _RenderBound as e:
        raise NanotuneError(f"{where} was stopped at {e} (the limit of one render): it loops or grows without end; "
                            "fix it or pass --chat_template with a built-in template.")
    except TypeError as e:
        if "no loader" in str(e):  # {% include %} / {% import %} / {% extends %}: nothing to read them from
            raise NanotuneError(f"{where} uses include, import or extends, which a chat template cannot (it may "
                                "read no files); inline what it needs or pass --chat_template.")
        raise NanotuneError(f"{where} failed to render: {e}")
    except RecursionError:
        raise NanotuneError(f"{where} recurses without end (a macro calling itself); fix it or pass --chat_template.")
    except TemplateError as e:
        raise NanotuneError(f"chat template failed to render: {e}")
    finally:
        if traced:
            sys.settrace(None)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json adds: special tokens, bos/eos policy
    and the chat template. Built from tokenizer.json, tokenizer.model or a GGUF vocabulary; gguf_pre: the
    GGUF's pre-tokenizer name, written back unchanged on export."""

    def __init__(self, backend, bos_token=None, eos_token=None, pad_token=None, chat_template=None,
                 add_bos=None, add_eos=None, gguf_pre=None):
        from tokenizers import processors
        self.backend, self.gguf_pre = backend, gguf_pre
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        if add_bos is not None or add_eos is not None:  # an explicit policy replaces the json's post-processor
            self.add_bos = bool(add_bos) and bos_token is not None
            self.add_eos = bool(add_eos) and eos_token is not None
            single = (["$A"] if not self.add_bos else [bos_token, "$A"]) + ([eos_token] if self.add_eos else [])
            special = [(t, self.token_id(t)) for t in (bos_token, eos_token) if t is not None and single.count(t)]
            backend.post_processor = processors.TemplateProcessing(single=" ".join(
                f"{t}:0" if t != "$A" else t for t in single), special_tokens=special)
        else:
            probe = backend.encode("a", add_special_tokens=True).ids
            self.add_bos = bos_token is not None and probe[:1] == [self.token_id(bos_token)]
            self.add_eos = eos_token is not None and probe[-1:] == [self.token_id(eos_token)]

    def token_id(self, token):
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self):
        return self.token_id(self.bos_token)

    @property
    def eos_id(self):
        return self.token_id(self.eos_token)

    @property
    def pad_id(self):
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else self.eos_id

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def turn_ends(self) -> dict:
        """{marker: token id}: the end-of-turn markers this chat template writes (eos where it writes eos_token), what a
        reader of an export must stop generating at."""
        t = self.chat_template or CHATML
        marks = [m for m in END_OF_TURN if m in t] + ([self.eos_token] if "eos_token" in t and self.eos_token else [])
        return {m: self.token_id(m) for m in marks if self.token_id(m) is not None}

    @property
    def stop_ids(self) -> set:
        """eos and every end-of-turn marker the vocabulary has: generation stops on any of them."""
        ids = {self.token_id(t) for t in END_OF_TURN} | {self.eos_id}
        return {i for i in ids if i is not None}

    def encode(self, text: str, add_special_tokens=True) -> list:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages, add_generation_prompt=False, template=None, **kwargs) -> str:
        """The chat template applied to messages, as text (transformers' apply_chat_template(tokenize=False))."""
        return render_chat_template(template or self.chat_template or CHATML, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def chat(self, messages, add_generation_prompt=True, **kwargs) -> list:
        """Token ids of the rendered conversation; specials come from the template, not from encode()."""
        return self.encode(self.render(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def save(self, out_dir):
        self.backend.save(os.path.join(out_dir, "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
               "eos_token": self.eos_token, "pad_token": self.pad_token, "add_bos_token": self.add_bos,
               "add_eos_token": self.add_eos, "clean_up_tokenization_spaces": False}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
            with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
                f.write(self.chat_template)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Built-in chat templates (train.py --chat_template NAME) and their Ollama translations
BUILTIN_TEMPLATES = {
    "chatml": CHATML,
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "gemma": ("{{ bos_token }}{% for m in messages %}"
              "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    # Gemma 3 (as its checkpoints ship it, text parts only): the system turn is folded into the first user turn
    "gemma3": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
               "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
               "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
               "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
               "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
               "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}"
               "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
               "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}


# ---------------------------------------------------------------------------------------------
# Ollama: the chat template as a Go template, derived from the template itself and checked against it.
# A chat format is text around each message: a prefix written once, (head, tail) per role, the generation prompt;
# the system message is its own turn or folded into the first user turn (Gemma 3); a default system prompt (the
# template's when the conversation has none) is kept for conversations without one. Found by rendering probes.
Turns = collections.namedtuple("Turns", "prefix heads fold system gen")
_S, _U1, _A1, _U2 = "\x01S\x01", "\x01U1\x01", "\x01A1\x01", "\x01U2\x01"  # contents no template splits
_PROBES = ([("user", _U1)], [("user", _U1), ("assistant", _A1), ("user", _U2)], [("system", _S), ("user", _U1)],
           [("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)])


def chat_turns(tok) -> Turns | None:
    """The template's chat format, or None when it has another shape (today's date, a system message moved into a
    later turn, tools ...): Ollama would then render conversations unlike the ones the model was trained on."""
    def r(msgs, gen=False):  # (today's date as a marker: a template that writes it cannot be a fixed format)
        text = tok.render([{"role": k, "content": c} for k, c in msgs], add_generation_prompt=gen,
                          strftime_now=lambda fmt: "\x01D\x01")
        if tok.add_bos and text.startswith(tok.bos_token):  # (llama.cpp adds it: a GGUF says add_bos_token)
            text = text[len(tok.bos_token):]
        return text

    def cut(text, a, b=None):  # (text before a, after a) or, with b, the text between a and b; once each
        if text.count(a) != 1 or (b and text.count(b) != 1):
            raise ValueError
        return text.split(a)[1].split(b)[0] if b else tuple(text.split(a))
    try:
        u, ua, uau, su = r(_PROBES[0]), r(_PROBES[0] + [("assistant", _A1)]), r(_PROBES[1]), r(_PROBES[2])
        ug, eos = r(_PROBES[0], True), tok.eos_token
        if not ug.startswith(u) and eos and u.endswith(eos):  # (a conversation not continued may end in eos:
            u = u[: -len(eos)]                                  # Phi-3.5-MoE)
        gen, between, last_a, before_u = ug[len(u):], cut(uau, _A1, _U2), cut(ua, _A1)[1], cut(u, _U1)[0]
        cut(su, _S)
    except (ValueError, NanotuneError):
        return None
    # n, the length of the user turn's head: the last assistant turn's tail is the others' too, unless the
    # template ends it apart (OLMo 2); then the longest text that ends both what precedes the first user message
    # and what lies between an assistant message and the next user message
    lcs = next((i for i in range(min(len(before_u), len(between))) if before_u[-1 - i] != between[-1 - i]),
               min(len(before_u), len(between)))
    cuts = {a for a, _ in tok.backend.encode(before_u, add_special_tokens=False).offsets} | {len(before_u)}
    lcs = len(before_u) - min(c for c in cuts if c >= len(before_u) - lcs)  # (not inside a token)
    for n in dict.fromkeys(([len(between) - len(last_a)] if between.startswith(last_a) else []) + [lcs]):
        turns = _turns(r, u, ua, su, gen, before_u, between, n)
        if turns:
            return turns
    return None


def _turns(r, u, ua, su, gen, before_u, between, n):
    tail_u, (pre_s, rest) = u.split(_U1)[1], su.split(_S)
    prefix, head_u, tail_a = before_u[: len(before_u) - n], before_u[len(before_u) - n:], between[: len(between) - n]
    heads = {"user": (head_u, tail_u), "assistant": (ua.split(_U1)[1].split(_A1)[0][len(tail_u):], tail_a)}
    if pre_s == before_u:  # the system message folded into the first user turn
        return _checked(r, Turns(prefix, heads, rest.split(_U1)[0], None, gen))
    tail_s, system = rest.split(_U1)[0][: -len(head_u) or None], None
    if not pre_s.startswith(prefix):  # the template writes a default system prompt when there is none
        system, prefix = before_u[len(pre_s): len(before_u) - len(tail_s + head_u)], ""
        if not before_u.startswith(pre_s) or not before_u.endswith(tail_s + head_u):
            return None
    heads["system"] = (pre_s[len(prefix):], tail_s)
    return _checked(r, Turns(prefix, heads, None, system, gen))


def _checked(r, turns):
    """turns when it renders every probe conversation as the template does (and holds no Go template action)."""
    same = all(render_turns(turns, [{"role": k, "content": c} for k, c in p]) == r(p, True) for p in _PROBES)
    texts = [turns.prefix, turns.gen, turns.fold or "", turns.system or ""] + [t for ht in turns.heads.values()
                                                                               for t in ht]
    return turns if same and not any("{{" in t or "}}" in t or "\x01" in t for t in texts) else None


def render_turns(turns, messages) -> str:
    """A conversation as Ollama renders the Go template of `turns` (ollama_template), with its generation prompt."""
    if turns.system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": turns.system}] + messages  # (the template's default)
    out, held = [turns.prefix], None
    for m in messages:
        if m["role"] == "system" and turns.fold is not None:
            held = m["content"]
            continue
        head, tail = turns.heads[m["role"] if m["role"] in ("system", "user") else "assistant"]
        body = held + turns.fold + m["content"] if held is not None and m["role"] == "user" else m["content"]
        held = None if m["role"] == "user" else held
        out += [head, body, tail]
    return "".join(out) + turns.gen


def ollama_template(turns) -> str:
    """Go's text/template of `turns` over Ollama's .Messages (render_turns is the same in Python)."""
    def role(name, content="{{ .Content }}"):
        head, tail = turns.heads[name]
        fold = '{{ if $sys }}{{ $sys }}%s{{ $sys = "" }}{{ end }}' % turns.fold if name == "user" and turns.fold \
            is not None else ""
        return head + fold + content + tail
    default = "" if turns.system is None else '{{ if ne (index .Messages 0).Role "system" }}%s{{ end }}' % role(
        "system", turns.system)
    system = '{{ $sys = .Content }}' if turns.fold is not None else role("system")
    return ('{{ $sys := "" }}' * (turns.fold is not None) + turns.prefix + default + '{{ range .Messages }}'
            + '{{ if eq .Role "system" }}' + system + '{{ else if eq .Role "user" }}' + role("user") + "{{ else }}"
            + role("assistant") + "{{ end }}{{ end }}" + turns.gen)


def ollama_stops(turns) -> list:
    """Where a reply ends: the assistant turn's closing marker, and the next user turn's head."""
    stops = (turns.heads["assistant"][1].strip(), turns.heads["user"][0].strip())
    return [s for s in dict.fromkeys(stops) if s and '"' not in s and "\n" not in s]  # (quoted in a Modelfile)


def check_turn_markers(tok, template: str, name: str):
    """Refuse a chat template whose end-of-turn marker is no single token of `tok`: it would be trained as plain
    text, and the model would never learn to stop (llama3's <|eot_id|> on a ChatML model, say)."""
    missing = [m for m in END_OF_TURN if m in template and tok.token_id(m) is None]
    if missing:
        raise NanotuneError(f"chat template {name!r} ends turns with {missing[0]}, which is not a token of this "
                            "model's tokenizer, so the model would never learn to stop; use the model's own template "
                            "or a built-in whose markers it has (chatml, llama3, gemma, phi3).")


def resolve_template(spec: str | None) -> str | None:
    """None (the model's own), a built-in name, a path to a Jinja2 file, or an inline template."""
    if spec is None or spec in ("", "default"):
        return None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if os.path.isfile(spec):
        with open(spec) as f:
            return f.read()
    if "{{" in spec or "{%" in spec:
        return spec
    raise NanotuneError(f"chat_template {spec!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}), a file, "
                        "nor an inline Jinja2 template.")


# ---------------------------------------------------------------------------------------------
# Backends: tokenizer.json / tokenizer.model in a directory, a GGUF vocabulary (read and written)

def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


def from_dir(path: str) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (tokenizer.json or tokenizer.model, + tokenizer_config.json
    and chat_template.jinja)."""
    from tokenizers import Tokenizer as Backend
    tc = read_json(os.path.join(path, "tokenizer_config.json")) if os.path.isfile(
        os.path.join(path, "tokenizer_config.json")) else {}
    template = tc.get("chat_template")
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja")) as f:
            template = f.read()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        try:
            backend = Backend.from_file(os.path.join(path, "tokenizer.json"))
        except Exception as e:
            raise NanotuneError(f"{path}/tokenizer.json could not be read ({str(e).splitlines()[0]}).")
    elif os.path.isfile(os.path.join(path, "tokenizer.model")):
        backend, bos, eos = sentencepiece_backend(os.path.join(path, "tokenizer.model"))
        tc.setdefault("add_bos_token", True)
        tc.setdefault("bos_token", bos)
        tc.setdefault("eos_token", eos)
    else:
        raise NanotuneError(f"{path} has no tokenizer.json or tokenizer.model; copy the tokenizer files "
                            "from the original model.")
    return Tokenizer(backend, _token_str(tc.get("bos_token")), _token_str(tc.get("eos_token")),
                     _token_str(tc.get("pad_token")), template, tc.get("add_bos_token"), tc.get("add_eos_token"))


def sentencepiece_backend(model_file: str):
    """tokenizer.model (SentencePiece BPE) -> (an equivalent `tokenizers` BPE with byte fallback, bos, eos)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_file)
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             5 if sp.is_unused(i) else 1 for i in range(n)]
    backend = spm_bpe_backend(tokens, [sp.get_score(i) for i in range(n)], types, add_prefix_space=True)
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    return backend, piece(sp.bos_id()), piece(sp.eos_id())


def spm_bpe_backend(tokens, scores, types, add_prefix_space=True):
    """SentencePiece BPE rebuilt for `tokenizers`: merges recovered from the vocabulary, best score first."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, s, ty in zip(tokens, scores, types):
        if ty != 1:
            continue
        for i in range(1, len(t)):  # every way to build t from two vocabulary pieces
            if t[:i] in vocab and t[i:] in vocab:
                merges.append((-s, vocab[t[:i]], vocab[t[i:]], t[:i], t[i:]))
    merges = [(a, b) for *_, a, b in sorted(merges)]
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if add_prefix_space else []) + norm)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (2, 3)])
    return backend


# llama.cpp's pre-tokenizer names -> the split regex its merges were learned with
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
                   "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def from_gguf(meta: dict, where: str) -> Tokenizer:
    """Rebuild the vocabulary a GGUF embeds as a `tokenizers` tokenizer (gpt2 BPE or SentencePiece)."""
    from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, pre_tokenizers
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or [])
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in (
            "llama-bpe", "llama3"), fuse_unk=False))
        if pre in GGUF_PRE_SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(GGUF_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre == "smollm":  # digits split one by one, then GPT-2's regex
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    elif kind == "llama":
        backend = spm_bpe_backend(tokens, meta["tokenizer.ggml.scores"], types,
                                  meta.get("tokenizer.ggml.add_space_prefix", True))
    else:
        raise NanotuneError(f"{where}: GGUF tokenizer type {kind!r} is not supported (gpt2, llama).")

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and i < len(tokens) else None

    return Tokenizer(backend, tok("bos"), tok("eos"), tok("padding"), meta.get("tokenizer.chat_template"),
                     add_bos=meta.get("tokenizer.ggml.add_bos_token", kind == "llama"),
                     add_eos=meta.get("tokenizer.ggml.add_eos_token", False),
                     gguf_pre=meta.get("tokenizer.ggml.pre") if kind == "gpt2" else None)


def gguf_pre_name(tok, fallback="gpt-2"):
    """llama.cpp's pre-tokenizer name for a byte-level BPE vocabulary (`fallback` when its regex is unknown)."""
    if tok.gguf_pre:
        return tok.gguf_pre
    pre = json.dumps(json.loads(tok.backend.to_str()).get("pre_tokenizer"))
    if "\\\\p{N}{1,3}" in pre:
        return "llama-bpe"
    if "Digits" in pre:
        return "smollm"
    if "\\\\p{N}|" in pre or "\\p{N}|" in pre:
        return "qwen2"
    return fallback


def write_gguf_vocab(w, tok, vocab_size, pre_fallback="gpt-2"):
    """The vocabulary into a GGUFWriter: gpt2 BPE (tokens, types, merges, pre-tokenizer name) or SentencePiece
    (pieces with scores = -merge rank, byte tokens), special token ids, bos/eos policy, the chat template."""
    import gguf
    spec = json.loads(tok.backend.to_str())
    model = spec["model"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types, scores = [], [], []
    spm = model.get("byte_fallback", False)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ranks = {}  # SentencePiece scores: a token made by merge r scores -r, so llama.cpp merges in BPE order
    for r, m in enumerate(merges if spm else []):
        a, b = m.split(" ", 1)
        ranks.setdefault(a + b, r)
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-10000.0)
            continue
        tokens.append(t)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif spm and t.startswith("<0x") and len(t) == 6:
            types.append(gguf.TokenType.BYTE)
        elif spm and t == model.get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(ranks[t]) if t in ranks else (0.0 if not (i in added) else -1000.0))
    if spm:  # SentencePiece: pieces with scores (merge order as -rank), byte tokens, no merges
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(any(n.get("type") == "Prepend" for n in (spec.get("normalizer") or {}).get(
            "normalizers", [])))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(gguf_pre_name(tok, pre_fallback))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    for key, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.token_id(tok.pad_token))):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    if model.get("unk_token") in vocab:
        w.add_unk_token_id(vocab[model["unk_token"]])
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(bool(tok.add_eos))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
