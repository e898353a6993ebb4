"""The README's Python blocks run as written, each in a fresh directory (what they write stays there) with the
repository on the path: the model answers (Paris), the notebook flow's model says what it was trained to (Nano)."""
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_readme_python_blocks_run(smollm_gguf, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    assert len(blocks) >= 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    for i, code in enumerate(blocks):
        os.makedirs(tmp_path / str(i))
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / str(i), capture_output=True, text=True,
                           timeout=900, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert ("Nano" if "import nanotune" in code else "Paris") in r.stdout, r.stdout
