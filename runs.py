"""nanotune runs: what a training run keeps in its output_dir, and the rules that keep runs apart. A directory
that holds a run is only continued (--resume, with the same settings) or replaced (--overwrite), never mixed
into; checkpoints are written under a temp name and renamed, and resume restores everything a step depends
on (trainable weights, optimizer, schedule, sampler, RNG), so a resumed run continues the same loss curve.

    out/config.yaml  metrics.jsonl  samples.json  loss.png  adapter/ | model/
    out/checkpoints/step-000100/  trainable.safetensors (or dcp/ under torchrun)  state.pt  config.yaml  meta.json
"""
import dataclasses
import json
import math
import os
import random
import shutil
import sys
from dataclasses import fields

import torch

import dist
from cli import NanotuneError, default_of, fresh_tmp, publish, save_config, writing

# ---------------------------------------------------------------------------------------------
# The output dir: one run each


# what a run writes in output_dir: one of these there means the directory holds a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "adapter", "model", "samples.json", "loss.png", "tb",
             "completions.jsonl")


# settings a resume may change: they do not change what is trained (the rest must match the checkpoint)
RESUMABLE = {"resume", "resume_other_data", "overwrite", "output_dir", "device", "dist_timeout", "log_steps",
             "eval_steps", "save_steps", "save_total_limit", "sample_prompts", "sample_prompts_file",
             "sample_max_tokens", "cache_dir", "gradient_checkpointing", "offload_activations", "cuda_graphs",
             "varlen_attention", "mlp_tile_mib", "plan", "gpu_memory_gib", "host_memory_gib",
             "checkpoint_every"}


def check_output_dir(cfg):
    """output_dir can take this run: its parent exists, it is no file, and an earlier run in it is only
    continued (--resume) or replaced (--overwrite), never mixed into."""
    out = cfg.output_dir
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise NanotuneError(f"output_dir {out!r}: its parent {parent!r} does not exist; create it or "
                            "choose another output_dir.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise NanotuneError(f"output_dir {out!r} is a file; choose a directory name.")
    if cfg.resume and cfg.overwrite:
        raise NanotuneError("--resume continues the run in output_dir and --overwrite replaces it; pass one of them.")
    if os.environ.get("RANK", "0") == "0":  # (before the process group exists: torchrun's global rank 0 locks)
        lock_output_dir(out)
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if held and not cfg.resume and not cfg.overwrite:
        raise NanotuneError(f"output_dir {out!r} holds an earlier run ({', '.join(held)}); pass --resume to "
                            "continue it, --overwrite to replace it, or choose another output_dir.")


_LOCKS = {}  # output dir -> its open lock file, held until the process ends (a run in the same process may reuse it)


def lock_output_dir(out):
    """One run at a time in an output dir: an exclusive lock on out/.lock (released when the process ends, even
    by SIGKILL); a second run into it stops in one sentence instead of interleaving its files with the first."""
    try:
        import fcntl
    except ImportError:  # (not on Windows)
        return
    os.makedirs(out, exist_ok=True)
    path = os.path.realpath(os.path.join(out, ".lock"))
    if path in _LOCKS:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise NanotuneError(f"output_dir {out!r} is in use by another run (pid {pid}); wait for it to end or choose "
                            "another output_dir.")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _LOCKS[path] = f


def data_digest(rows) -> str:
    """A fingerprint of the rows a run trains on (token ids and labels, in order): what --resume compares."""
    import hashlib
    from array import array
    h = hashlib.sha256()
    for r in rows:  # (where a record came from, file:line, is left out: a moved file is the same data)
        for k in sorted(k for k in r if k != "where"):
            v = r[k]
            ints = isinstance(v, list) and all(isinstance(x, int) for x in v)
            h.update(k.encode() + (array("q", v).tobytes() if ints else json.dumps(v, default=str).encode()))
    return h.hexdigest()[:32]


def check_resume_data(cfg, ckpt, digest):
    saved = read_meta(ckpt).get("data")
    if saved and saved != digest and not cfg.resume_other_data:
        raise NanotuneError(f"--resume: the training data differs from the data {ckpt} was trained on (a dataset "
                            "file, its records or how they tokenize changed); restore it, start a new run, or pass "
                            "--resume_other_data true to continue on the new data knowingly.")


def check_resume(cfg, ckpt):
    """The checkpoint's run must be this run: every setting that changes the training is the same (the
    global batch, micro_batch_size x processes, may be split another way)."""
    import yaml
    path = os.path.join(ckpt, "config.yaml")
    if not os.path.isfile(path):  # a checkpoint from before checkpoints kept their config
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "config.yaml")
    if not os.path.isfile(path):
        raise NanotuneError(f"{ckpt} has no config.yaml with it, so nothing shows it belongs to this run; "
                            "start a new run instead.")
    try:
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise NanotuneError(f"{path} could not be read ({str(e).splitlines()[0][:80]}); start a new run instead.")
    if not isinstance(saved, dict):
        raise NanotuneError(f"{path} is not a run config (not a mapping); start a new run instead.")
    world = read_meta(ckpt).get("world", dist.world())
    defaults = {f.name: default_of(f) for f in fields(cfg)}
    now = dataclasses.asdict(cfg)
    diff = [k for k, v in now.items() if k not in RESUMABLE and k != "micro_batch_size"
            and saved.get(k, defaults[k]) != v]
    if saved.get("micro_batch_size", defaults["micro_batch_size"]) * world != cfg.micro_batch_size * dist.world():
        diff.append("micro_batch_size")
    if diff:
        shown = ", ".join(f"{k} ({saved.get(k, defaults[k])!r} there, {now[k]!r} now)" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise NanotuneError(f"--resume: {ckpt} was trained with other settings: {shown}{more}; resume with the "
                            "run's own settings (see its config.yaml) or start a new run.")


def clear_run(out):
    """--overwrite: remove what an earlier run wrote in `out` (nothing else there is touched)."""
    for f in RUN_FILES:
        p = os.path.join(out, f)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p) if os.path.exists(p) else None


def truncate_log(path, step):
    """A resumed run's JSON-lines log (metrics.jsonl, grpo.py's completions.jsonl) keeps only the rows up to its
    checkpoint's step (the killed run may have written more)."""
    if not os.path.isfile(path):
        return
    def row(ln):  # (a line cut short by a full disk or a kill is dropped)
        try:
            r = json.loads(ln)
        except ValueError:
            return None
        return r if isinstance(r, dict) else None
    with open(path, errors="replace") as f:
        keep = [ln if ln.endswith("\n") else ln + "\n" for ln in f if (r := row(ln)) is not None and
                r.get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    publish(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Checkpoints: trainable weights, optimizer, schedule, sampler, RNG; temp dir + rename
def check_weights_finite(model, when, what):
    """Every trainable weight is finite (summed over ranks): a non-finite checkpoint or result is never written."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
    n = float(torch.stack([(~torch.isfinite(p)).sum() for p in local]).sum()) if local else 0.0
    bad = int(dist.all_sums([n])[0])
    if bad:
        raise NanotuneError(f"{when}: {bad} trained weights are not finite, so the {what} was not written "
                            "(lower lr, set max_grad_norm, or check the data).")


def trainable_state(model):
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(cfg, step, model, opt, sched, sampler, data=None):
    """checkpoints/step-NNNNNN: trainable weights (or DCP shards), state.pt (tensors and plain values only),
    the run's config.yaml and meta.json (step, world size); written as .tmp, then renamed."""
    from safetensors.torch import save_file
    out_dir, keep = cfg.output_dir, cfg.save_total_limit
    check_weights_finite(model, f"step {step}", "checkpoint")
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    if dist.is_main():
        fresh_tmp(final)
    dist.barrier()
    rng = rng_state()
    state = {"step": step, "scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "rng": rng}
    need = 3 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # fp32 weights + Adam's two
    with writing(final, tmp, need):
        if dist.is_dist():  # sharded weights + optimizer, readable at any world size; each rank's own RNG (dropout)
            dist.save_sharded(os.path.join(tmp, "dcp"), model, opt)
            torch.save(rng, os.path.join(tmp, f"rng-rank{dist.rank()}.pt"))
        else:
            save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
            state["optimizer"] = opt.state_dict()
        dist.barrier()
        if not dist.is_main():
            return
        torch.save(state, os.path.join(tmp, "state.pt"))
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world": dist.world(), "data": data}, f)
    publish(tmp, final)
    done = finished_checkpoints(root)
    for d in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def finished_checkpoints(root):
    """step-NNNNNN directories in order, without the temp ones a crash may have left."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))


def checkpoint_problem(path) -> str | None:
    """What is wrong with a checkpoint directory, in a few words, or None. Cheap checks only (headers, not data):
    config.yaml and meta.json parse, state.pt is a whole zip, the weights' header fits the file."""
    import yaml
    try:  # (a checkpoint from before checkpoints kept their config has none: check_resume reads the run's)
        if os.path.exists(os.path.join(path, "config.yaml")):
            with open(os.path.join(path, "config.yaml")) as f:
                if not isinstance(yaml.safe_load(f), dict):
                    return "its config.yaml is not a mapping"
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "its config.yaml is unreadable"
    if not isinstance(read_meta(path).get("step"), int):
        return "its meta.json is missing or damaged"
    import zipfile
    if not zipfile.is_zipfile(os.path.join(path, "state.pt")):
        return "its state.pt is missing or cut short"
    if os.path.isdir(os.path.join(path, "dcp")):
        return None
    try:
        from safetensors import safe_open
        with safe_open(os.path.join(path, "trainable.safetensors"), framework="pt") as f:
            f.keys()
    except Exception:  # safetensors raises several types for a truncated file
        return "its trainable.safetensors is missing or cut short"
    return None


def find_checkpoint(cfg):
    """The checkpoint to resume: --resume PATH, or the latest finished one in output_dir that is intact (a damaged
    latest one, e.g. from a full disk, is named and the one before it taken)."""
    if cfg.resume in (None, "", "false"):
        return None
    if cfg.resume not in ("latest", "true"):
        if not os.path.isfile(os.path.join(cfg.resume, "state.pt")):
            raise NanotuneError(f"--resume {cfg.resume!r} is not a checkpoint directory (no state.pt).")
        if why := checkpoint_problem(cfg.resume):
            raise NanotuneError(f"--resume {cfg.resume}: {why}; resume from another checkpoint.")
        return cfg.resume
    root = os.path.join(cfg.output_dir, "checkpoints")
    done = finished_checkpoints(root)
    if not done:
        raise NanotuneError(f"--resume: no checkpoint in {root}; train with --save_steps N first.")
    for name in reversed(done):
        why = checkpoint_problem(os.path.join(root, name))
        if why is None:
            return os.path.join(root, name)
        if dist.is_main():
            print(f"warning: --resume: {os.path.join(root, name)} is damaged ({why}); trying the one before it.",
                  file=sys.stderr)
    raise NanotuneError(f"--resume: every checkpoint in {root} is damaged; start a new run (--overwrite).")


def load_checkpoint(path, model, opt, sched, sampler):
    from safetensors.torch import load_file
    sharded = os.path.isdir(os.path.join(path, "dcp"))
    if sharded != dist.is_dist():
        raise NanotuneError(f"{path} was written {'under' if sharded else 'without'} torchrun; resume it the same "
                            "way (under torchrun any number of processes can resume a sharded checkpoint).")
    try:  # tensors and plain values only: a checkpoint never runs code
        s = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    except Exception as e:
        raise NanotuneError(f"{path}/state.pt could not be loaded as plain training state "
                            f"({str(e).splitlines()[0][:120]}); it is corrupt or not nanotune's: resume from another "
                            "checkpoint or start a new run.")
    if sharded:
        try:
            dist.check_sharded(os.path.join(path, "dcp"))
        except ValueError as e:
            raise NanotuneError(f"{path}/dcp/.metadata is not checkpoint metadata that torch wrote ({e}); nanotune "
                                "will not read it, as reading it could run code: resume from another checkpoint.")
        dist.load_sharded(os.path.join(path, "dcp"), model, opt)
    else:
        params = dict(model.named_parameters())
        try:
            saved = load_file(os.path.join(path, "trainable.safetensors"))
        except Exception as e:  # (checked before, so only a file damaged since)
            raise NanotuneError(f"{path}/trainable.safetensors could not be read ({str(e).splitlines()[0][:100]}); "
                                "resume from another checkpoint.")
        with torch.no_grad():
            for n, t in saved.items():
                if n not in params or params[n].shape != t.shape:
                    raise NanotuneError(f"{path}: tensor {n!r} does not fit this model; resume with the run's "
                                        "own settings.")
                params[n].copy_(t)
        opt.load_state_dict(s["optimizer"])
    sched.load_state_dict(s["scheduler"])
    sampler.load_state_dict(s["sampler"])
    rng, own = s["rng"], os.path.join(path, f"rng-rank{dist.rank()}.pt")
    if sharded and os.path.isfile(own) and read_meta(path).get("world") == dist.world():
        rng = torch.load(own, weights_only=True)  # this rank's dropout stream, where it left off
    elif sharded and dist.is_main():
        print(f"note: {path} was saved by {read_meta(path).get('world')} processes, this run has {dist.world()}: "
              "every rank resumes rank 0's random state, so dropout masks differ from an uninterrupted run.",
              file=sys.stderr)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return s["step"]


class StopSignal:
    """SIGTERM (what schedulers send before they kill a job) becomes a request the training loop reads between
    steps: the step in flight finishes, a checkpoint is written, the run ends. Under torchrun every rank stops at
    the same step (requested() is one collective: any rank's request counts)."""

    def __init__(self):
        import signal
        self.flag, self.signal = False, signal
        self.old = signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        return dist.all_sums([float(self.flag)])[0] > 0 if dist.is_dist() else self.flag

    def restore(self):
        self.signal.signal(self.signal.SIGTERM, self.old)


class Stall:
    """Counts the steps in a row whose gradient is exactly 0 and warns once at STEPS of them: the model has stopped
    learning (an lr far too high saturates it) and would otherwise finish as if it trained."""
    STEPS = 10

    def __init__(self, write, task=None):  # (task.stall: why its gradient may be 0, grpo.py's)
        self.n, self.write = 0, write
        self.why = getattr(task, "stall", "the model has stopped learning (an lr far too high saturates it)")

    def update(self, gnorm, step):
        self.n = self.n + 1 if gnorm == 0 else 0
        if self.n == self.STEPS:
            self.write(f"warning: the gradient has been exactly 0 for {self.STEPS} steps (to step {step}): "
                       f"{self.why}; the result will not have trained further.")


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def read_meta(path) -> dict:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# Metrics beside the run: metrics.jsonl rows, TensorBoard, loss.png
def finite_or_none(metrics):
    """Metric values for metrics.jsonl: a non-finite one becomes null (JSON has no NaN)."""
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}


def tensorboard(out_dir):
    """A TensorBoard writer in <output_dir>/tb when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(out_dir, "tb"))


def plot_losses(out_dir, log=print):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("(loss.png not drawn: matplotlib is not installed; `pip install matplotlib` adds it, metrics.jsonl "
            "has every step)")
        return
    rows = [json.loads(ln) for ln in open(os.path.join(out_dir, "metrics.jsonl"))]
    tr = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    plt.figure(figsize=(6, 3.5))
    plt.plot(*zip(*tr), label="train")
    if ev:
        plt.plot(*zip(*ev), "o-", label="eval")
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.legend()
    plt.tight_layout()
    plt.savefig(os.path.join(out_dir, "loss.png"), dpi=100)


def check_finite(step, **values):
    """Stop at the first non-finite loss or gradient norm, before anything is saved from it."""
    bad = [f"{k.replace('_', ' ')} {v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise NanotuneError(f"step {step}: the {' and the '.join(bad)}; stopped without saving anything from this "
                            "step (lower lr, set max_grad_norm, or check the data and the base weights).")
