"""Faults: bad data is skipped and reported (or stops the run past 10%), a NaN loss stops it with the last good
checkpoint kept, and a process killed mid-save leaves the previous checkpoint intact and resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from ipadapter.core.adapter import Adapter
from ipadapter.core.errors import IPAdapterError
from ipadapter.training.train import checkpoints, train
from train_support import config, max_diff, model_dir, weights, write_dataset


def _spoil(data, corrupt=(), missing=(), empty=(), cmyk=()):
    """Damage items of a written dataset in place."""
    folder = data.parent
    items = json.loads(data.read_text())
    for i in corrupt:
        (folder / items[i]["image_file"]).write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    for i in missing:
        (folder / items[i]["image_file"]).unlink()
    for i in empty:  # no caption at all ("" would be an image-only item)
        del items[i]["text"]
    for i in cmyk:
        Image.new("CMYK", (20, 18), (0, 200, 0, 0)).save(folder / "odd.jpg")
        items[i]["image_file"] = "odd.jpg"
    data.write_text(json.dumps(items))


def test_bad_items_are_skipped_counted_and_reported(tmp_path):
    data = write_dataset(tmp_path / "data", n=30)
    _spoil(data, corrupt=[3], missing=[7], empty=[11], cmyk=[15])
    out = train(config(data, tmp_path / "out", max_steps=12, batch_size=4))  # 48 draws: every item at least once
    assert out.is_file()
    log = (tmp_path / "out" / "train.log").read_text()
    assert "skipped 3 of 30 items" in log
    for reason in ("1 missing file", "1 no caption", "1 unreadable image", "1 CMYK"):
        assert reason in log, log
    assert "003.png" in log  # names an example


def test_more_than_ten_percent_bad_stops_with_a_clear_error(tmp_path):
    data = write_dataset(tmp_path / "data", n=20)
    _spoil(data, corrupt=[1, 2], missing=[5])  # 3 of 20 = 15%
    with pytest.raises(IPAdapterError, match=r"3 of 20 items are unusable \(15%, over the 10% limit\)"):
        train(config(data, tmp_path / "out", cache=str(tmp_path / "cache")))
    assert not (tmp_path / "out" / "ip-adapter.safetensors").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_dataset(tmp_path / "data", n=8)
    out = tmp_path / "out"
    # lr 1e30: the first update blows the weights up, the next forward overflows
    with pytest.raises(IPAdapterError, match=r"loss is nan at step 2: training stopped; the last good checkpoint "
                                             r"is .*step-000001"):
        train(config(data, out, max_steps=6, save_every=1, lr=1e30, cache=str(tmp_path / "cache")))
    assert [s for s, _ in checkpoints(out)] == [1]
    assert not (out / "ip-adapter.safetensors").exists()


def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    data = write_dataset(tmp_path / "data", n=8)
    cache = str(tmp_path / "cache")
    straight = train(config(data, tmp_path / "straight", max_steps=4, save_every=2, cache=cache))
    out = tmp_path / "out"
    train(config(data, out, max_steps=2, save_every=2, cache=cache))
    before = weights(out / "checkpoints" / "step-000002" / "ip-adapter.safetensors")

    cmd = [sys.executable, "-m", "ipadapter.cli", "train", "--model", str(model_dir()), "--data", str(data),
           "--output", str(out), "--max-steps", "4", "--batch-size", "2", "--resolution", "16", "--save-every", "2",
           "--cache", cache, "--resume", "--set", "tensorboard=false", "--set", "progress=false"]
    env = dict(os.environ, IPADAPTER_TEST_SAVE_SLEEP="60", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp = out / "checkpoints" / ".step-000004.tmp"
    deadline = time.time() + 180
    while not (tmp / "state.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp / "state.pt").is_file(), proc.communicate(timeout=5)[1][-2000:]
    proc.send_signal(signal.SIGKILL)  # inside the save: files written, not yet renamed into place
    proc.wait(timeout=30)

    assert [s for s, _ in checkpoints(out)] == [2]  # the half-written one does not count
    previous = out / "checkpoints" / "step-000002"
    assert max_diff(weights(previous / "ip-adapter.safetensors"), before) == 0
    Adapter.from_file(previous / "ip-adapter.safetensors")  # still a valid adapter file
    resumed = train(config(data, out, max_steps=4, save_every=2, cache=cache, resume=True))
    assert not tmp.exists()  # the stale temporary folder is cleared
    assert max_diff(weights(resumed), weights(straight)) <= 1e-6
