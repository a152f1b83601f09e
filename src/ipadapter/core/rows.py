"""Row markers: the pipeline lays out the image-prompt rows of its own UNet batch, the adapter follows.

diffusers pipelines arrange ``ip_adapter_image_embeds`` for their batch themselves (unconditional and
conditional rows, PAG's perturbed copy, InstructPix2Pix's image-only branch, SAG's degraded pass, frames of a
video) and hand them to the denoiser in ``added_cond_kwargs["image_embeds"]``. Instead of real embeddings, an
:class:`~ipadapter.generation.pipeline.IPAdapter` hands each adapter a tiny marker, ``[negative; positive]``
rows of shape ``[1, 1, 2]`` each (``(MARK, row)``: ``row`` indexes the adapter's precomputed ``[uncond; cond]``
tokens); the denoiser's forward pre-hook reads the markers back as row indices, and every layer gathers its
precomputed image keys/values by them. The projection and the image K/V stay computed once per generation.

A marker is recognised by its shape alone (``[rows, 1, 2]``: no image encoder has width 2), so reading it
never waits for a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MARK = -7.0  # first value of every marker row (exact in float16 / bfloat16)


def markers(n_adapters: int, prompts: int = 1, device=None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One ``[2 * prompts, 1, 2]`` marker per adapter: rows 0..p-1 point at the unconditional tokens,
    p..2p-1 at the conditional ones (the order diffusers' ``ip_adapter_image_embeds`` takes: negative first)."""
    rows = torch.arange(2 * prompts, dtype=dtype, device=device)
    marker = torch.stack([torch.full_like(rows, MARK), rows], dim=-1)[:, None]
    return [marker.clone() for _ in range(n_adapters)]


def is_marker(t) -> bool:
    return torch.is_tensor(t) and t.ndim in (3, 4) and t.shape[-1] == 2 and t.shape[-2] == 1 and t.numel() > 0


def read_rows(image_embeds) -> list[torch.Tensor] | None:
    """The row indices (long, one tensor per adapter) a pipeline handed to the denoiser, or None when what it
    handed are no markers of ours (real embeddings, or nothing)."""
    if torch.is_tensor(image_embeds):
        image_embeds = [image_embeds]
    if not isinstance(image_embeds, Sequence) or not image_embeds or not all(is_marker(t) for t in image_embeds):
        return None
    return [t.reshape(t.shape[0], -1)[:, 1].round().long() for t in image_embeds]


def fit_rows(rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Rows for a denoiser batch of ``batch``: as laid out, or each row repeated when the denoiser batch is a
    multiple (several text prompts per group, a video's frames folded into the batch); None when neither fits."""
    n = rows.shape[0]
    if n == batch:
        return rows
    if n and batch % n == 0:
        return rows.repeat_interleave(batch // n)
    return None


def unguided_rows(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Without guidance a pipeline takes each ``[negative; positive]`` marker as positive rows: twice the rows
    of its batch. Then the conditional row of each pair is the one it meant."""
    if batch and rows.shape[0] == 2 * batch:
        return rows.view(-1, 2)[:, 1]
    return rows
