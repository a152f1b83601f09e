"""Row markers: the pipeline lays out the image-prompt rows of its own UNet batch, the adapter follows.

diffusers pipelines arrange ``ip_adapter_image_embeds`` for their batch themselves (unconditional and
conditional rows, PAG's perturbed copy, InstructPix2Pix's image-only branch, SAG's degraded pass, frames of a
video) and hand them to the denoiser in ``added_cond_kwargs["image_embeds"]``. Instead of real embeddings, an
:class:`~ipadapter.generation.pipeline.IPAdapter` hands each adapter a tiny marker, ``[negative; positive]``
rows of shape ``[1, 1, 2]`` each (``(MARK, row)``: ``row`` indexes the adapter's precomputed ``[uncond; cond]``
tokens); the denoiser's forward pre-hook reads the markers back as row indices, and every layer gathers its
precomputed image keys/values by them (:func:`frame_index`: one image set per text prompt, one reference per
frame of a video). The projection and the image K/V stay computed once per generation.

A marker is recognised by its shape alone (``[rows, 1, 2]``: no image encoder has width 2), so reading it
never waits for a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MARK = -7.0  # first value of every marker row (exact in float16 / bfloat16)
UNCOND, COND = 0, 1  # a marker row's branch: the adapter's unconditional or conditional tokens


def markers(n_adapters: int, device=None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One ``[2, 1, 2]`` marker per adapter: row 0 points at the unconditional tokens, row 1 at the conditional
    ones (the order diffusers' ``ip_adapter_image_embeds`` takes: negative first). Which of the adapter's token
    rows a branch means for each item of the batch (several image sets, one reference per frame) is the adapter
    state's to say (:func:`frame_index`)."""
    rows = torch.tensor([UNCOND, COND], dtype=dtype, device=device)
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


def call_rows(rows: torch.Tensor, batch: int, guided: bool) -> torch.Tensor:
    """The rows a pipeline meant for a denoiser call of ``batch`` samples. Without guidance every row it hands is
    a conditional one (diffusers reads ``ip_adapter_image_embeds`` as positive embeds then: several text prompts
    get the ``[negative; positive]`` marker as two prompts' rows); with guidance, see :func:`dropped_uncond_rows`."""
    rows = unguided_rows(rows, batch)
    if not guided:
        return torch.full_like(rows, COND)
    return dropped_uncond_rows(rows, batch, guided)


def dropped_uncond_rows(rows: torch.Tensor, batch: int, guided: bool) -> torch.Tensor:
    """A guided call whose pipeline handed only conditional rows for a batch twice (or an even multiple of) their
    number dropped the unconditional ones (SAG's main pass hands ``image_embeds.chunk(2)[1]`` for its
    [unconditional; conditional] batch): the unconditional rows come back in front."""
    n = rows.shape[0]
    if guided and n and batch % (2 * n) == 0 and bool((rows == COND).all()):
        return torch.cat([torch.full_like(rows, UNCOND), rows])
    return rows


def frame_index(branches: torch.Tensor, frames: int, per_branch: int, has_uncond: bool, mode: str = "repeat",
                starts: Sequence[int] | None = None) -> torch.Tensor | None:
    """Which of an adapter's token rows each item of a spatial batch reads.

    ``branches`` (one per denoiser sample: UNCOND or COND) as the pipeline laid them out; each sample spans
    ``frames`` consecutive items of the spatial layers' batch (AnimateDiff folds a video's frames into the batch,
    sample-major). The adapter's tokens are ``[uncond rows; cond rows]``, ``per_branch`` rows each (only the cond
    rows without ``has_uncond``). Item k of a branch (counted over its samples' frames, in order) reads row:

    - ``repeat``: one row per equal run of the branch's items (one image set per text prompt; one row: all);
    - ``hold``: one row per frame (``frames`` > 1: frame f of every video) or per batch item, the last row held
      when there are fewer rows (ComfyUI_IPAdapter_plus's unfold_batch); with ``starts``, row j from frame
      ``starts[j]`` until the next one's.

    None when the rows cannot be laid out so (a ``repeat`` branch whose item count is no multiple of its rows).
    Worked out on the CPU (a few numbers; the caller caches it for the call) and returned on ``branches``' device.
    """
    device, branches = branches.device, branches.detach().cpu()
    frames = max(int(frames), 1)
    m = max(int(per_branch), 1)
    out = torch.empty(branches.shape[0] * frames, dtype=torch.long)
    for branch in (UNCOND, COND):
        where = (branches == branch).nonzero().flatten()
        if not where.numel():
            continue
        items = (where[:, None] * frames + torch.arange(frames)).flatten()  # this branch's spatial items, in order
        k = torch.arange(items.numel())
        if m == 1:
            rows = torch.zeros_like(k)
        elif mode == "repeat":
            if items.numel() % m:
                return None
            rows = k // (items.numel() // m)
        else:
            pos = k % frames if frames > 1 else k
            if starts is not None:
                pos = torch.searchsorted(torch.tensor(list(starts)), pos, right=True) - 1
            rows = pos.clamp(0, m - 1)
        out[items] = rows + (branch * m if has_uncond else 0)
    return out.to(device)
