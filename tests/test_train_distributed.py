"""Two CPU processes (gloo, launched with the shipped configs/ddp.yaml) with batch b train the weights of one
process with batch 2b; logging and saving happen once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipadapter.training.train import checkpoints, train
from train_support import config, max_diff, model_dir, weights, write_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow  # three fresh interpreters (launcher + 2 ranks) import torch + diffusers: ~30-45 s on 2 cores
def test_two_processes_match_one_with_twice_the_batch(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed")
    data = write_dataset(tmp_path / "data", n=12)
    out = tmp_path / "two"
    cmd = [accelerate, "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "0", "-m", "ipadapter.cli", "train",
           "--model", str(model_dir()), "--data", str(data), "--output", str(out), "--max-steps", "3",
           "--batch-size", "2", "--resolution", "16", "--save-every", "2", "--no-cache",
           "--set", "tensorboard=false", "--set", "log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ip-adapter.safetensors") == 1  # printed by rank 0 only

    one = train(config(data, tmp_path / "one", max_steps=3, batch_size=4, save_every=2))
    assert max_diff(weights(out / "ip-adapter.safetensors"), weights(one)) < 1e-5

    log = (out / "train.log").read_text()
    assert "2 process(es)" in log and log.count("wrote ") == 1 and log.count("step 3:") == 1
    assert [s for s, _ in checkpoints(out)] == [2, 3]
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").iterdir()) == \
        ["ip-adapter.safetensors", "rng-0.pt", "rng-1.pt", "state.pt"]
