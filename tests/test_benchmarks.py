"""The per-step benchmark (benchmarks/bench_attention.py) runs and compares like with like. No timing assertions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


def test_bench_attention_quick_prints_the_table():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "| kind | bare ms/step | ours ms/step (+%) | diffusers ms/step (+%) |" in out
    for kind in ("global", "plus", "full"):
        row = re.search(rf"^\| {kind} \|(.*)\|$", out, re.MULTILINE)
        assert row is not None, f"no {kind} row in:\n{out}"
        # last cell: max abs diff between our output and diffusers' on the same weights and inputs
        assert float(row.group(1).split("|")[-1]) < 1e-3, row.group(0)
        acts = re.search(rf"^{kind}: max abs diff ours vs bare UNet ([0-9.e+-]+)", out, re.MULTILINE)
        assert acts is not None and float(acts.group(1)) > 1e-3, out


def test_bench_flux_quick_prints_the_table():
    bench = BENCH.parent / "bench_flux.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "| adapter | bare ms/step | ours ms/step (added) | diffusers ms/step (added) |" in out
    for label in ("XLabs v1 (4 tokens)", "XLabs v2 (16 tokens)"):
        row = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", out, re.MULTILINE)
        assert row is not None, f"no {label} row in:\n{out}"
        assert float(row.group(1).split("|")[-1]) < 1e-4, row.group(0)  # ours == diffusers on the same weights
        acts = re.search(rf"^{re.escape(label)}: max abs diff ours vs bare transformer ([0-9.e+-]+)", out, re.MULTILINE)
        assert acts is not None and float(acts.group(1)) > 1e-3, out


def test_bench_sd3_quick_compares_ours_with_diffusers():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    bench = BENCH.parent / "bench_sd3.py"
    done = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = re.search(r"^\| [0-9.]+ \|(.*)\|$", done.stdout, re.MULTILINE)
    assert row is not None, done.stdout
    assert float(row.group(1).split("|")[-1]) < 1e-4, row.group(0)  # ours == diffusers on the same weights
    acts = re.search(r"max abs diff ours vs bare transformer ([0-9.e+-]+)", done.stdout)
    assert acts is not None and float(acts.group(1)) > 1e-3, done.stdout
