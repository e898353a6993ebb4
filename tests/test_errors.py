"""Bad model input ends with one clear line on stderr and exit 1, never a traceback."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, make_hf_model


def run_generate(model_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", str(model_path),
                        "--max_new_tokens", "2"], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip()


def truncated_safetensors(tmp_path):
    make_hf_model("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return tmp_path


def truncated_gguf(tmp_path, src):
    with open(src, "rb") as f:
        head = f.read(4 << 20)  # header, metadata and a few tensors; the rest is missing
    (tmp_path / "cut.gguf").write_bytes(head)
    return tmp_path / "cut.gguf"


def unsupported_type(tmp_path):
    make_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"),
    ("no_config", "has no config.json"),
    ("unsupported", "model_type 'bert' is not supported"),
    ("truncated_safetensors", "truncated or corrupt"),
    ("truncated_gguf", "truncated or corrupt"),
])
def test_bad_model_input_is_one_clear_line(case, expect, tmp_path, smollm_gguf):
    path = {"missing": lambda: tmp_path / "nope",
            "no_config": lambda: tmp_path,
            "unsupported": lambda: unsupported_type(tmp_path),
            "truncated_safetensors": lambda: truncated_safetensors(tmp_path),
            "truncated_gguf": lambda: truncated_gguf(tmp_path, smollm_gguf)}[case]()
    rc, err = run_generate(path)
    assert rc == 1
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expect in err, err
