"""The value rules of a generation request, shared by Python callers, the CLI and the page.

Errors name the Python parameter as ``name=value`` (``guidance_scale=nan: ...``); the CLI rewrites those to its
flags (``--guidance nan: ...``). A size far from the model's native one is allowed, with a note.
"""

from __future__ import annotations

import math

from ..core.errors import IPAdapterError, note

MAX_IMAGES = 64  # one call's batch; image k has seed S+k, so more come from further calls with other seeds
MAX_SIDE = 8192  # pixels per side (64x the VAE's 8 px cell, 1024 latent cells); SDXL's native side is 1024
MAX_STEPS = 1000  # the usual schedulers' training timesteps: no scheduler can run more denoising steps
FAR = 2.0  # a side over FAR x or under 1/FAR x the native one gets a note


def check_guidance(guidance_scale: float) -> float:
    """A finite classifier-free guidance scale (1 or less turns guidance off, diffusers' rule)."""
    try:
        value = float(guidance_scale)
    except (TypeError, ValueError):
        raise IPAdapterError(f"guidance_scale={guidance_scale!r}: must be a number (7.5 is usual)") from None
    if not math.isfinite(value):
        raise IPAdapterError(f"guidance_scale={value}: must be a finite number (7.5 is usual; 1 turns guidance off)")
    return value


def check_counts(num_inference_steps: int, num_images: int, max_steps: int = MAX_STEPS) -> None:
    """Whole step and image counts in range: at least 1, at most ``max_steps`` / :data:`MAX_IMAGES`."""
    for name, value, top in (("num_inference_steps", num_inference_steps, max_steps),
                             ("num_images", num_images, MAX_IMAGES)):
        if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float)
                                                                            and value.is_integer()):
            raise IPAdapterError(f"{name}={value!r}: must be a whole number")
        if not 1 <= int(value) <= top:
            why = ("the scheduler's training timesteps" if name == "num_inference_steps"
                   else "one call's batch; call again with other seeds for more")
            raise IPAdapterError(f"{name}={value}: must be between 1 and {top} ({why})")


def check_size(width: int, height: int, native: tuple[int, int] | None = None, multiple: int = 8) -> None:
    """Whole multiples of ``multiple`` up to :data:`MAX_SIDE`; a note when far from the ``native`` size."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise IPAdapterError(f"{name}={value!r}: must be a whole multiple of {multiple} (the VAE's cell)")
        if value > MAX_SIDE:
            raise IPAdapterError(f"{name}={value}: at most {MAX_SIDE} pixels per side")
    if native is None:
        return
    ratios = (width / native[0], height / native[1])
    if any(r > FAR or r < 1 / FAR for r in ratios):
        slower = width * height / (native[0] * native[1])
        cost = f"; about {slower:.0f}x the pixels, so that much slower per step" if slower > FAR else ""
        note(f"size {width}x{height} is far from this model's native {native[0]}x{native[1]}: images may come out "
             f"repeated or broken{cost}")


def check_request(guidance_scale: float, num_inference_steps: int, num_images: int, size: tuple[int, int],
                  native: tuple[int, int] | None = None, max_steps: int = MAX_STEPS) -> float:
    """Every rule above; returns the guidance scale as a float."""
    check_counts(num_inference_steps, num_images, max_steps)
    check_size(int(size[0]), int(size[1]), native)
    return check_guidance(guidance_scale)
