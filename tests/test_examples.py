"""Every registered method has an example that runs offline on an embedded tiny model and writes its
output (run as subprocesses, in parallel)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffusion_attn as da

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
METHODS = sorted(da.methods())


def test_one_example_per_method():
    missing = [m for m in METHODS if not (EXAMPLES / f"{m}.py").exists()]
    assert not missing, f"add examples/<method>.py for: {', '.join(missing)}"
    for name in METHODS:
        text = (EXAMPLES / f"{name}.py").read_text()
        assert "from_pretrained(" in text, f"examples/{name}.py should show the real-checkpoint call"
        assert "--model" in text and f'"{name}"' in text


def test_examples_run(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {
        name: subprocess.Popen([sys.executable, str(EXAMPLES / f"{name}.py"), "--steps", "2", "--output", str(tmp_path / name)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in METHODS if (EXAMPLES / f"{name}.py").exists()
    }
    failures = []
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{name}: exit {proc.returncode}\n{out[-2000:]}")
            continue
        written = [p for p in (tmp_path / f"{name}{s}" for s in (".png", ".mp4", ".gif")) if p.exists()]
        if len(written) != 1 or written[0].stat().st_size == 0 or f"wrote {written[0]}" not in out:
            failures.append(f"{name}: expected one output {name}.png/.mp4/.gif in {tmp_path}\n{out[-2000:]}")
        elif "applied Handle(" not in out:
            failures.append(f"{name}: did not apply the method\n{out[-2000:]}")
    if failures:
        pytest.fail("\n\n".join(failures))
