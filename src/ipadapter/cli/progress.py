"""A denoising progress bar on stderr for ``generate``: shown on a terminal, and in logs for long generations."""

from __future__ import annotations

import sys
import time

LONG_S = 10.0  # a generation expected to take longer than this shows progress even when stderr is no terminal


class StepProgress:
    """A diffusers ``callback_on_step_end`` that drives a tqdm bar.

    The bar starts after the first step, when the time per step is known: at once on a terminal, otherwise only
    when the whole denoising is expected to take over :data:`LONG_S` seconds (then updating every 10 s, so a log
    file gets a few lines, not one per step).
    """

    def __init__(self, file=None, long_s: float | None = None):
        self.file = file if file is not None else sys.stderr
        self.long_s = LONG_S if long_s is None else long_s
        isatty = getattr(self.file, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.bar = None
        self.started = time.monotonic()

    def __call__(self, pipe, step: int, timestep, tensors: dict) -> dict:
        total = int(getattr(pipe, "num_timesteps", 0) or 0) or step + 1
        if self.bar is None:
            expected = (time.monotonic() - self.started) / (step + 1) * total
            if self.tty or expected > self.long_s:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=step + 1, desc="denoising", unit="step", file=self.file,
                                mininterval=0.2 if self.tty else 10.0, dynamic_ncols=self.tty)
        else:
            self.bar.update(1)
        return tensors

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
