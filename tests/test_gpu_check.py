"""benchmarks/gpu_check.py runs on CPU at tiny size: every section prints its table and parity checks itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow  # ~25 s of CPU time; more wall time on a shared machine
def test_gpu_check_quick_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json",
                           str(tmp_path / "rows.json")], capture_output=True, text=True, env=env, timeout=900)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    for kind in ("global", "plus", "full", "faceid"):
        for dtype in ("fp32", "bf16"):
            assert re.search(rf"^\| sd15 \| {kind} \| {dtype} \| [0-9.e+-]+ \| [0-9.e+-]+ \| [0-9.e+-]+ \| pass \|$",
                             out, re.MULTILINE), f"{kind} {dtype}:\n{out}"
    assert "parity: 8 passed, 0 failed" in out
    assert re.search(r"^\| sd15 \| plus \| fp32 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$", out,
                     re.MULTILINE), out
    assert re.search(r"^\| 1 \| fp32 \| [0-9.]+ \| nan \|$", out, re.MULTILINE), out  # a real training step ran
    assert (tmp_path / "rows.json").is_file()


def test_gpu_check_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
