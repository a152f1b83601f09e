"""Argument types and the group grammar shared by the subcommands (argparse only; no library logic)."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import warnings

from ..core.errors import shown_as

#: library parameter -> the flag that sets it: errors and notes name parameters, the command line shows flags
FLAGS = {
    "images": "--image", "weights": "--image-weight", "masks": "--image-mask", "negative_images": "--negative-image",
    "embeds": "--embeds", "face_embeds": "--face-embeds", "scale": "--scale", "combine": "--combine",
    "start": "--start", "end": "--end", "curve": "--curve", "blocks": "--blocks", "init_image": "--init-image",
    "strength": "--strength", "mask_image": "--inpaint-mask", "controlnets": "--controlnet",
    "control_images": "--control-image", "control_scales": "--control-scale", "num_inference_steps": "--steps",
    "guidance_scale": "--guidance", "seed": "--seed", "num_images": "--num-images", "width": "--width",
    "height": "--height", "image_encoder": "--image-encoder", "model": "--model", "adapter": "--adapter",
    "data": "--data", "data_root": "--data-root", "clip": "--clip", "true_cfg": "--true-cfg",
    "negative_prompt": "--negative-prompt",
}


def flag_message(message) -> str:
    """An error's or note's text as the command line says it: parameters named by their flags."""
    return shown_as(message, FLAGS)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _scale(text: str) -> float:
    value = _float(text)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number >= 0 (1.0 = image only, ~0.5 with text)")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (the VAE downsamples by 8)")
    return value


@contextlib.contextmanager
def _quiet_libraries():
    """No diffusers/transformers progress bars, info logs or FutureWarnings: stderr is for our one-line errors."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:  # restore for in-process callers (tests, notebooks)
        for lib, (level, bars) in zip(libraries, saved):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}: must be a fraction between 0 and 1")
    return value


def _finite(text: str) -> float:
    value = _float(text)
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return value


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, or one per image separated by commas") from None


class _Grouped(argparse.Action):
    """Repeated groups on one command line: ``--adapter A ... --adapter B ...``, ``--controlnet C ...``.

    The flag that starts a group (``starts``) opens a new one; every other grouped flag fills the latest group
    (flags before the first starter belong to the first group). A single-valued flag may appear once per group.
    """

    def __init__(self, option_strings, dest, group: str, key: str, repeat: bool = False, starts: bool = False,
                 **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.group, self.key, self.repeat, self.starts = group, key, repeat, starts

    def __call__(self, parser, namespace, values, option_string=None):
        if self.nargs == 0:  # an on/off flag (--tiles)
            values = True
        groups = getattr(namespace, f"{self.group}_groups", None)
        if groups is None:
            groups = []
            setattr(namespace, f"{self.group}_groups", groups)
        if self.starts:
            if groups and not groups[-1].get("_started"):
                group = groups[-1]  # flags given before the first starter are this group's
            else:
                group = {}
                groups.append(group)
            group[self.key], group["_started"] = values, True
            return
        if not groups:
            groups.append({})
        group = groups[-1]
        if self.repeat:
            group.setdefault(self.key, []).append(values)
        elif self.key in group:
            parser.error(f"{option_string} given twice for --{self.group} {len(groups)}; "
                         f"each --{self.group} takes its own (see the grammar in --help)")
        else:
            group[self.key] = values


@contextlib.contextmanager
def _notes(once: bool = False):
    """Print library notes (an image resized ...) as ``note: ...`` lines on stderr as they happen; ``once``: each
    text once (eval: the same note for every batch)."""
    from ..core.errors import IPAdapterNote

    with warnings.catch_warnings():
        warnings.simplefilter("always", IPAdapterNote)
        shown = warnings.showwarning
        printed: set[str] = set()

        def show(message, category, *args, **kwargs):
            if issubclass(category, IPAdapterNote):
                text = f"note: {flag_message(message)}"
                if not (once and text in printed):
                    print(text, file=sys.stderr)
                printed.add(text)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield



def flag_names(message: str) -> str:
    """``name=value`` in a library message (generation.limits) as the CLI says it: ``--flag value``."""
    return re.sub(rf"\b({'|'.join(FLAGS)})=", lambda m: f"{FLAGS[m.group(1)]} ", message)
