"""nanotune's command line, shared by every script: a problem the user can fix is one sentence and exit 1
(NanotuneError, cli), and a run's typed config is read from --flags and a YAML file with the same keys
(flags win), checked against each field's legal range before anything loads.

    cfg = parse_config(sys.argv[1:], TrainConfig)   # --lr 1e-4, --config run.yaml, --learning_rate 1e-4 ...
    cli(main)                                       # errors: `error: <sentence>` on stderr, exit 1

Also the one way a finished file or directory appears under its final name (`publish`: written under a
temp name, then renamed), so a crash never leaves something that looks finished.
"""
import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import shutil
import sys
from dataclasses import field, fields


class NanotuneError(Exception):
    """A problem the user can fix; scripts print its one sentence and exit 1, no traceback."""


def cli(main, cleanup=None):
    """Run a script's main(): a NanotuneError becomes one line on stderr and exit status 1."""
    import sys
    try:
        main()
    except NanotuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; nothing unfinished was left under a final name.", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a full or read-only disk, a path that is a file, ...: the OS's reason and the path
        where = f" {e.filename}" if e.filename else ""
        tmp = f" (a partial {e.filename} may remain: delete it)" if str(e.filename).endswith(".tmp") else ""
        print(f"error: could not read or write{where}: {e.strerror or e}{tmp}; free space, fix the permissions or "
              "choose another path.", file=sys.stderr)
        sys.exit(1)
    finally:
        if cleanup:
            cleanup()


class Parser(argparse.ArgumentParser):
    """argparse for the scripts: a bad flag is one `error:` line and exit 1, like every other input error."""

    def error(self, message):
        raise NanotuneError(f"{message}; see --help.")


def read_json(path, kind=dict):
    """A JSON file that must hold a `kind` (an object by default); anything else is one sentence."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise NanotuneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or replace the file.")
    except UnicodeDecodeError:
        raise NanotuneError(f"{path} is not UTF-8 text; fix or replace the file.")
    except RecursionError:
        raise NanotuneError(f"{path} is nested too deeply to read; fix or replace the file.")
    if kind is not None and not isinstance(value, kind):
        raise NanotuneError(f"{path} holds a JSON {type(value).__name__}, not an object; fix or replace the file.")
    return value


def bundled(name: str) -> str:
    """A file of nanotune's examples/ folder: `examples/NAME` when run from the nanotune folder (as the README
    does), else its absolute path, so the default job works from any directory."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join("examples", name) if os.path.abspath(os.getcwd()) == here else os.path.join(
        here, "examples", name)


def fresh_tmp(final: str) -> str:
    """An empty temp directory beside `final` (final + ".tmp"), to be published once complete."""
    tmp = final.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def disk_full(e: BaseException) -> bool:
    """Whether an error is the disk running out of space (safetensors and torch.save word it their own way)."""
    import errno
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "no space left" in str(e).lower() or (
                "unexpected pos" in str(e)):  # (torch.save's zip writer on a full disk)
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def writing(path: str, tmp: str | None = None, need: int = 0):
    """Around a write of `path` (through `tmp`, removed on failure): a full disk becomes one sentence naming the
    path, what is free and about what the write needs."""
    try:
        yield
    except Exception as e:
        if not disk_full(e):
            raise
        if tmp and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp and os.path.exists(tmp):
            os.remove(tmp)
        where = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(where).free if os.path.isdir(where) else 0
        needs = f", about {size(need)} needed" if need else ""
        raise NanotuneError(f"the disk holding {path} is full ({size(free)} free{needs}); nothing was written under "
                            "that name: free space or choose another path.") from None


def size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def publish(tmp: str, final: str):
    """Move a complete temp file or directory to its final name, replacing what was there."""
    if os.path.isdir(final) and not os.path.islink(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


# ---------------------------------------------------------------------------------------------
# A run's config: every dataclass field is a --flag and a YAML key
# A config class is a dataclass of F_ fields; its class attributes `limits` ({field: (test, the legal range
# in words)}, merged down the class hierarchy) and `aliases` ({another tool's name: field}) are optional.
def F_(default, help, const=None):  # noqa: N802 - a dataclass field with its --help text
    """const: the value of the bare flag (`--resume` alone); bool fields take "true"."""
    meta = {"help": help, "const": const}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _convert(f: dataclasses.Field, value, where):
    """Coerce a CLI string or YAML value to the field's type; a wrong one is a one-line error."""
    t = str(f.type)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if "None" in t:
            return None
        raise NanotuneError(f"{where}{f.name} needs a value ({getattr(f.type, '__name__', t)}); remove the key to "
                            "keep the default.")
    try:
        if "bool" in t and not isinstance(value, bool):
            if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return str(value).lower() in ("true", "1", "yes")
        if "list" in t:
            if isinstance(value, (dict, bool)):
                raise ValueError
            items = value if isinstance(value, list) else [value]  # "a,b" and "a b" both give [a, b]
            return [p for v in items for p in (str(v).split(",") if isinstance(v, str) else [v]) if p != ""]
        if ("int" in t or "float" in t) and isinstance(value, (bool, list, dict)):
            raise ValueError  # YAML `true` or [1] is no number
        if "int" in t:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in t:
            return float(value)
        if isinstance(value, (list, dict)):
            raise ValueError
        return value if isinstance(value, (bool, int, float, str)) else str(value)
    except (TypeError, ValueError, OverflowError):
        raise NanotuneError(f"{where}{f.name} must be {getattr(f.type, '__name__', t)}, got {value!r}.")


def check_limits(cfg, where):
    """Refuse a value outside its legal range (the `limits` of the config class and its bases) in one sentence."""
    limits = {}
    for c in reversed(type(cfg).__mro__):
        limits.update(vars(c).get("limits", {}))
    for name, (ok, legal) in limits.items():
        v = getattr(cfg, name)
        if v is not None and not ok(v):
            raise NanotuneError(f"{where.get(name, '--')}{name} {v!r} is out of range; use {legal}.")


def _closest(key, names, aliases):
    """The nearest valid name, by spelling or by another tool's name for it; "" when none is near."""
    m = difflib.get_close_matches(key, [*names, *aliases], n=1, cutoff=0.5)
    return aliases.get(m[0], m[0]) if m else ""


class _Parser(Parser):
    def error(self, message):
        if "unrecognized arguments" in message:
            flag = message.split(":", 1)[1].split()[0]
            near = _closest(flag.split("=")[0].lstrip("-"), self.names, self.aliases)
            raise NanotuneError(f"unknown flag {flag}{f' (did you mean --{near}?)' if near else ''}; see --help.")
        super().error(message)


def read_yaml(path, names, aliases, migrate=None):
    """{field: value} from a YAML mapping; another tool's key names are accepted (aliases), and another tool's whole
    file where `migrate` knows it (mapping, path -> (nanotune's mapping, lines to print) or None: axolotl.py)."""
    import yaml
    if not os.path.isfile(path):
        raise NanotuneError(f"config file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as fh:
            y = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise NanotuneError(f"{path}: not valid YAML ({str(e).splitlines()[0]}).")
    y = {} if y is None else y
    if not isinstance(y, dict):
        raise NanotuneError(f"{path}: the top level must be a mapping of keys (lr: 1e-4, ...), got a "
                            f"{type(y).__name__}.")
    if migrate and (other := migrate(y, path)) is not None:
        y, notes = other
        for line in notes:
            print(line, file=sys.stderr)
    values = {}
    for k, v in y.items():
        name = aliases.get(k, k)
        if name not in names:
            near = _closest(str(k), names, aliases)
            raise NanotuneError(f"{path}: unknown key {k!r}{f' (did you mean {near!r}?)' if near else ''}.")
        if name in values:
            raise NanotuneError(f"{path}: {k!r} and another key both set {name}; keep one.")
        values[name] = v
    return values


def parse_config(argv, cls):
    """A `cls` from --flags and --config YAML (flags win), each value converted and range-checked."""
    names, aliases = [f.name for f in fields(cls)], getattr(cls, "aliases", {})
    p = _Parser(description=sys.modules[cls.__module__].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False)
    p.names, p.aliases = [*names, "config"], aliases  # for the nearest-name hint
    p.add_argument("--config", help="YAML file with any of the keys below")
    aka = {n: [a for a, t in aliases.items() if t == n] for n in names}
    for f in fields(cls):
        kw = dict(default=argparse.SUPPRESS, dest=f.name,
                  help=f"{f.metadata.get('help', '')} (default: {default_of(f)})")
        flags = [f"--{f.name}", *(f"--{a}" for a in aka[f.name])]
        if "list" in str(f.type):
            p.add_argument(*flags, nargs="*", **kw)
        elif "bool" in str(f.type) or f.metadata.get("const"):
            p.add_argument(*flags, nargs="?", const=f.metadata.get("const") or "true", **kw)
        else:
            p.add_argument(*flags, **kw)
    args = vars(p.parse_args(argv))
    path = args.pop("config", None)
    values = read_yaml(path, names, aliases, getattr(cls, "migrate", None)) if path else {}
    where = {k: f"{path}: " for k in values} | {k: "--" for k in args}
    values.update(args)
    return _build(cls, values, where)


def _build(cls, values: dict, where: dict):
    """cls(**values), each value converted to its field's type, then range-checked (where: key -> message prefix)."""
    byname = {f.name: f for f in fields(cls)}
    cfg = cls(**{k: _convert(byname[k], v, where[k] if where[k] != "--" else "") for k, v in values.items()})
    check_limits(cfg, where)
    return cfg


def make_config(cls, values: dict, where="") -> object:
    """A `cls` from Python keyword values (nanotune.py's functions), checked as flags are: unknown names get the
    nearest valid one, each value is converted and range-checked."""
    names, aliases = [f.name for f in fields(cls)], getattr(cls, "aliases", {})
    for k in values:
        if aliases.get(k, k) not in names:
            near = _closest(k, names, aliases)
            raise NanotuneError(f"{where}unknown setting {k!r}{f' (did you mean {near!r}?)' if near else ''}.")
    values = {aliases.get(k, k): v for k, v in values.items()}
    return _build(cls, values, {k: where for k in values})


def save_config(cfg, path):
    import yaml
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    publish(path + ".tmp", path)


@contextlib.contextmanager
def quiet():
    """stderr (Python's and the C library's, file descriptor 2) to /dev/null inside the block (llama.cpp's logs)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
