"""Decoupled cross-attention, base-agnostic parts: per-layer adapter weights, per-adapter state, helpers.

Z = softmax(Q Kt^T / sqrt(d)) Vt + sum_a scale_a * softmax(Q Ki_a^T / sqrt(d)) Vi_a, before the output projection.

Image tokens never ride on the text embeddings: each attached adapter owns an :class:`AdapterState` holding
its image keys/values, computed once per generation by :meth:`AdapterState.set_tokens` (not at every denoising
step) and read by every layer's processor. The processors themselves are the base family's (one per family, for
every kind and any number of adapters: ``bases/unet.py`` for SD UNets), built from :func:`attend` and
:func:`layer_masks` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IPAdapterError
from .joint import joint_layers
from .rows import COND, UNCOND, call_rows, fit_rows, frame_index, read_rows

LAYOUT_HINT = "hand the pipeline the adapter's layout: pipe(..., **ip.pipeline_kwargs())"


class LoRALinear(nn.Module):
    """Low-rank delta ``up(down(x))`` (FaceID files carry these for the UNet's own attention)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))


class IPLayer(nn.Module):
    """One attention layer's adapter weights; names match the official "ip_adapter.<i>.*" keys."""

    def __init__(self, width: int, cross_dim: int | None, lora_rank: int = 0, kv_in: int | None = None,
                 bias: bool = False):
        super().__init__()
        if cross_dim is not None:  # XLabs' Flux adapters have biases on the image K/V, the others none
            self.to_k_ip = nn.Linear(cross_dim, width, bias=bias)
            self.to_v_ip = nn.Linear(cross_dim, width, bias=bias)
        if lora_rank:
            kv_in = kv_in or width
            self.to_q_lora = LoRALinear(width, width, lora_rank)
            self.to_k_lora = LoRALinear(kv_in, width, lora_rank)
            self.to_v_lora = LoRALinear(kv_in, width, lora_rank)
            self.to_out_lora = LoRALinear(width, width, lora_rank)
        # plain flags: every layer reads them at every step, and hasattr() on a module without the submodule raises
        # and catches an AttributeError inside nn.Module.__getattr__ (microseconds each, per layer, per step)
        self._has_kv, self._has_lora = cross_dim is not None, bool(lora_rank)

    @property
    def has_kv(self) -> bool:
        return self._has_kv

    @property
    def has_lora(self) -> bool:
        return self._has_lora


def ip_layers(config) -> dict[str, IPLayer]:
    """The per-layer adapter modules an :class:`~ipadapter.core.config.AdapterConfig` describes, keyed by the
    official checkpoint index (image K/V on cross-attention layers, FaceID LoRA where the file has it)."""
    if config.time_conditioned:  # InstantX SD3.5: AdaLN and QK norms per joint block
        return joint_layers(config)
    layers: dict[str, IPLayer] = {}
    for index in sorted(set(config.layer_widths) | set(config.lora_layers)):
        if index in config.layer_widths:
            width, cross = config.layer_widths[index], config.cross_attention_dim
            if config.attention == "concat":  # the "simple adapter": no image K/V of its own
                layers[str(index)] = IPLayer(width, None)
                continue
        else:  # self-attention LoRA (FaceID): same width as the block's cross-attention layer
            width = config.layer_widths.get(index + 1) or config.layer_widths.get(index - 1)
            cross = None
        rank = config.lora_layers.get(index, 0)
        layers[str(index)] = IPLayer(width, cross, rank, kv_in=cross or width, bias=config.kv_bias)
    return layers


Schedule = Callable[[float], float]


class AdapterState:
    """What one attached adapter contributes to the current generation, shared by all its layers.

    tokens are [rows, n_images, T, C]; ``rows`` is b (cond only) or 2b (unconditional rows first, like
    diffusers' stacked embeddings). Keys/values are computed for all layers at once in :meth:`set_tokens`.
    """

    def __init__(self, layers: dict[int, IPLayer], concat: bool = False):
        self.layers = layers
        self.concat = concat  # "simple adapter" ablation: tokens join the text tokens, no K/V of their own
        self.scale: float = 1.0
        self.layer_scales: dict[int, float] = {}
        self.schedule: Schedule | None = None
        self.lora_scale: float = 1.0
        self.masks: torch.Tensor | None = None  # [n_images, H, W] in [0, 1]
        # [n_images] >= 0, None = all 1: without masks, log(w) joins image i's attention logits (weight k == the
        # image given k times); with masks, w multiplies image i's own attention output
        self.image_weights: torch.Tensor | None = None
        self.cfg: bool | None = None  # None: infer from the batch size
        self.kv_scaling: str = "v"  # ComfyUI's embeds_scaling: see KV_SCALINGS and scale_keys_values
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows = 0
        self.has_uncond = False
        # kinds whose tokens depend on the timestep ("time-plus"): the projection, run once per denoiser call by
        # the family for all layers, and what that call made (its tokens, the per-layer scales at its timestep)
        self.projection: nn.Module | None = None
        self.step_tokens: torch.Tensor | None = None
        self.step_scales: dict[int, float] = {}
        # one image set per text prompt: (sets, branches) - the embeds' image axis holds every set's features
        # in turn, the rows are [negative; positive] (branches 2) or positive alone, each prompt-major
        self.step_sets: tuple[int, int] | None = None
        self._expanded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # the rows of [uncond; cond] the pipeline laid out for the current denoiser call (see core.rows), or None:
        # then the batch is taken as [uncond; cond] (the plain layout), and one that does not fit is an error
        self.call_rows: torch.Tensor | None = None
        # how a branch's rows spread over its batch items (core.rows.frame_index): "repeat" (one image set per
        # text prompt) or "hold" (one reference per batch item or frame, the last held; from frame_starts[j] on);
        # frames: the current call's frames per denoiser sample (AnimateDiff folds them into the spatial batch)
        self.row_map: str = "repeat"
        self.frame_starts: tuple[int, ...] | None = None
        self.frames: int = 1
        self._gathered: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._last_index: tuple | None = None  # (rows key, batch, frames, index) of the last gather's layout

    def set_tokens(self, cond: torch.Tensor | None, uncond: torch.Tensor | None = None) -> None:
        """Set the image tokens ([b, T, C] or [b, n_images, T, C]) and compute every layer's K/V once."""
        self._expanded.clear()
        self._gathered.clear()
        self._last_index = None
        self.kv.clear()
        self.step_tokens = None
        self.row_map, self.frame_starts = "repeat", None
        if cond is None:
            self.rows, self.has_uncond = 0, False
            return
        if cond.ndim == 3:
            cond = cond[:, None]
            uncond = uncond[:, None] if uncond is not None else None
        tokens = cond if uncond is None else torch.cat([uncond.to(cond), cond])
        self.rows, self.has_uncond = tokens.shape[0], uncond is not None
        for index, layer in self.layers.items():
            if self.concat:
                self.kv[index] = (tokens, tokens)
            elif layer.has_kv:
                t = tokens.to(layer.to_k_ip.weight.dtype)
                self.kv[index] = (layer.to_k_ip(t), layer.to_v_ip(t))

    def set_layer_tokens(self, indices, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> None:
        """Other tokens (same row layout as :meth:`set_tokens`) for some layers: a composition image's."""
        if cond.ndim == 3:
            cond = cond[:, None]
            uncond = uncond[:, None] if uncond is not None else None
        tokens = cond if uncond is None else torch.cat([uncond.to(cond), cond])
        if tokens.shape[0] != self.rows:
            raise ValueError(f"{tokens.shape[0]} token rows for {self.rows}: set the same prompts")
        self._expanded.clear()
        for index in indices:
            layer = self.layers[index]
            if layer.has_kv and not self.concat:
                t = tokens.to(layer.to_k_ip.weight.dtype)
                self.kv[index] = (layer.to_k_ip(t), layer.to_v_ip(t))

    def swap_branches(self, indices) -> None:
        """At these layers the unconditional rows get the image's K/V and the conditional rows zeros (what the
        image's zero tokens give: the K/V projections have no bias); ComfyUI's "precise" weight types."""
        self._expanded.clear()
        for index in indices:
            if index not in self.kv:
                continue
            swapped = []
            for t in self.kv[index]:
                cond = t[self.rows // 2:] if self.has_uncond else t
                swapped.append(torch.cat([cond, torch.zeros_like(cond)]) if self.has_uncond else torch.zeros_like(t))
            self.kv[index] = (swapped[0], swapped[1])

    @property
    def active(self) -> bool:
        return self.rows > 0

    def effective_scale(self, index: int, progress: float | torch.Tensor) -> float | torch.Tensor:
        """The adapter's weight at a layer: scale x block scale x the schedule at ``progress``. A float, except
        under torch.compile with a schedule, where ``progress`` is a 0-d tensor (see :func:`call_progress`) and so
        is the weight: a Python float would be a constant of the graph, compiled anew at every step."""
        scale = self.scale * self.layer_scales.get(index, 1.0)
        if self.schedule is not None and scale != 0:
            if torch.is_tensor(progress):
                return scale * self.schedule(progress)
            scale *= float(self.schedule(progress))
        return scale

    def keys_values(self, index: int, batch: int, cfg_hint: bool | Callable[[], bool] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's image K/V laid out for a UNet batch of ``batch`` rows ([batch, n, T, W]).

        With guidance the UNet batch is [unconditional rows; conditional rows], each prompt repeated for the
        images per prompt; without, conditional rows only. ``cfg_hint`` (the pipeline's own flag, or a function
        giving it, asked only here: when the pipeline laid out no rows and :attr:`cfg` is not set) decides then;
        failing both, an even multiple of the stacked rows means guidance.
        """
        if self.call_rows is not None:
            return self._rows_laid_out(index, batch)
        if self.row_map == "hold":  # one reference per item or frame: the plain [uncond; cond] guess, then held
            hint = cfg_hint() if self.cfg is None and callable(cfg_hint) else cfg_hint
            cfg = self.cfg if self.cfg is not None else (hint if hint is not None else self.has_uncond)
            samples = batch // self.frames if batch % self.frames == 0 else batch
            branches = torch.full((samples,), COND, dtype=torch.long)
            if cfg and self.has_uncond:
                branches[: samples // 2] = UNCOND
            return self._gather(index, batch, branches)
        k, v = self.kv[index]
        if self.cfg is None and callable(cfg_hint):
            cfg_hint = cfg_hint()
        cfg = self.cfg if self.cfg is not None else cfg_hint
        if cfg is None:
            cfg = self.has_uncond and batch % self.rows == 0
        if k.shape[0] == batch and (cfg or not self.has_uncond):
            return k, v
        cached = self._expanded.get((index, batch, cfg)) if caching() else None
        if cached is not None:
            return cached
        k, v = self._expand(k, batch, cfg), self._expand(v, batch, cfg)
        if caching():
            self._expanded[(index, batch, cfg)] = (k, v)
        return k, v

    def _rows_laid_out(self, index: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K/V gathered by the rows the pipeline laid out (cached while the same rows come back:
        pipelines hand the same embeddings at every step)."""
        rows = self.call_rows
        cached = self._gathered.get((index, batch, self.frames)) if caching() else None
        if cached is not None and cached[0] is rows:
            return cached[1]
        frames = self.frames if batch % self.frames == 0 else 1
        fitted = fit_rows(rows, batch // frames)  # the branch of each denoiser sample
        if fitted is None:
            raise IPAdapterError(
                f"the pipeline laid out {rows.shape[0]} image-prompt rows for a denoiser batch of {batch}; "
                "give one image prompt per adapter (ip.set_images) and no ip_adapter_image_embeds of your own"
            )
        return self._gather(index, batch, fitted, rows)

    def _gather(self, index: int, batch: int, branches: torch.Tensor, key=None) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K/V for a spatial batch of ``batch`` items whose denoiser samples are ``branches``."""
        cached = self._gathered.get((index, batch, self.frames)) if caching() else None
        if key is None:
            key = branches
            if cached is not None and _same(cached[0], branches):
                return cached[1]
        at = self._index(branches, batch, key)
        if at is None:
            sets = self.rows // 2 if self.has_uncond else self.rows
            raise IPAdapterError(f"{sets} image sets for a denoiser batch of {batch} ({branches.shape[0]} sample(s)): "
                                 "give one set per text prompt")
        k, v = self.kv[index]
        kv = (k.index_select(0, at.to(k.device)), v.index_select(0, at.to(v.device)))
        if caching():
            self._gathered[(index, batch, self.frames)] = (key, kv)
        return kv

    def _index(self, branches: torch.Tensor, batch: int, key) -> torch.Tensor | None:
        """The token row of each spatial item (core.rows.frame_index), worked out once for all layers of a call."""
        last = self._last_index if caching() else None
        if last is not None and last[1] == batch and last[2] == self.frames and \
                (last[0] is key or (key is branches and _same(last[0], branches))):
            return last[3]
        per_branch = self.rows // 2 if self.has_uncond else self.rows
        at = frame_index(branches, batch // branches.shape[0], per_branch, self.has_uncond, self.row_map,
                         self.frame_starts)
        if caching():
            self._last_index = (key, batch, self.frames, at)
        return at

    def _expand(self, t: torch.Tensor, batch: int, cfg: bool) -> torch.Tensor:
        if cfg and self.has_uncond:
            b = self.rows // 2
            if batch % (2 * b):
                raise IPAdapterError(
                    f"denoiser batch {batch} is not [unconditional; conditional] rows of {b} image prompt(s) "
                    f"(this pipeline stacks its batch otherwise): {LAYOUT_HINT}"
                )
            m = batch // (2 * b)
            return torch.cat([t[:b].repeat_interleave(m, 0), t[b:].repeat_interleave(m, 0)])
        cond = t[self.rows // 2:] if self.has_uncond else t
        if batch % cond.shape[0]:
            raise IPAdapterError(
                f"denoiser batch {batch} does not fit {cond.shape[0]} image prompt(s) (this pipeline calls the "
                f"denoiser on part of its batch): {LAYOUT_HINT}"
            )
        return cond.repeat_interleave(batch // cond.shape[0], 0)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.device == b.device and a.shape == b.shape and torch.equal(a, b))


class Runtime:
    """Per-denoiser facts the processors need at call time: denoising progress and latent size (set by the forward
    pre-hook that ``bases.attach`` installs, from what the family reads off each call)."""

    def __init__(self) -> None:
        self._progress: float = 0.0
        self._timestep = None  # this UNet call's timestep, not yet read (see progress)
        self.timestep = None  # the last call's timestep, read or not (what torch.compile computes progress from)
        self.latent_hw: tuple[int, int] | None = None
        self.num_train_timesteps: int = 1000
        self.cfg_hint: Callable[[], bool] | None = None  # the pipeline's do_classifier_free_guidance
        self.prompt_branch: int | None = None  # transformer families: the current call's image-prompt branch
        self.token_ids = None  # ... and its image tokens' position ids
        self.patch: int = 16  # pixels per image token side (Flux: VAE factor 8 x 2x2 packing)
        self.states: list[AdapterState] = []  # attached adapters, in the order of the pipeline's image embeds
        self._handed: tuple[list, list[torch.Tensor]] | None = None  # (embeds objects, their rows): last call's
        self.watched: tuple[nn.Module, nn.Module] | None = None  # (an attention layer, our processor on it)
        # rows per adapter for calls that bring no markers, from a pipeline known to drop them (InstructPix2Pix,
        # safe latent diffusion: see generation.pipeline.DROPPED_LAYOUTS); used where the batch fits them
        self.expected_rows: list[torch.Tensor] | None = None

    @property
    def progress(self) -> float | torch.Tensor:
        """Denoising progress of the current UNet call in [0, 1]: 1 - t / num_train_timesteps.

        Read lazily: ``float()`` of a timestep on the GPU waits for the GPU, which would stall every step even when
        no schedule needs the value. Under torch.compile a 0-d tensor, never read (see :func:`call_progress`).
        """
        if torch.compiler.is_compiling() and self.timestep is not None:
            return call_progress(self.timestep, self.num_train_timesteps)
        if self._timestep is not None:
            timestep, self._timestep = self._timestep, None
            self._progress = call_progress(timestep, self.num_train_timesteps)
        return self._progress

    @progress.setter
    def progress(self, value: float) -> None:
        self._progress, self._timestep = float(value), None

    def observe(self, facts) -> None:
        """Take what the family read from a denoiser call (:class:`~ipadapter.bases.base.CallFacts`)."""
        if facts.latent_hw is not None:
            self.latent_hw = facts.latent_hw
        if facts.timestep is not None:
            self._timestep = self.timestep = facts.timestep
        self.prompt_branch = getattr(facts, "prompt_branch", None)  # per call: None when this call says nothing
        self.token_ids = getattr(facts, "token_ids", None)
        self.check_processors()
        for state in self.states:
            state.frames = max(int(getattr(facts, "frames", 1) or 1), 1)
        self.follow_rows(getattr(facts, "image_embeds", None), getattr(facts, "batch", 0))

    def check_processors(self) -> None:
        """A pipeline that swaps in attention processors of its own (LEdits++ does) would drop the image prompt
        without a word: refuse instead."""
        if self.watched is None or self.watched[0].processor is self.watched[1]:
            return
        if any(state.active for state in self.states):
            raise IPAdapterError(
                "this pipeline replaced the denoiser's attention processors during the call, which would drop the "
                "image prompt (LEdits++ does for its cross-attention masks: pass use_cross_attn_mask=False, "
                "use_intersect_mask=False)"
            )

    def follow_rows(self, image_embeds, batch: int) -> None:
        """Give every adapter the rows the pipeline laid out in ``image_embeds`` (our markers) for a denoiser
        call on ``batch`` samples, or None when it handed none."""
        handed = list(image_embeds) if isinstance(image_embeds, (list, tuple)) else [image_embeds]
        keep = not torch.compiler.is_compiling()  # (row indices carry no gradients: kept while training too)
        if keep and self._handed is not None and len(handed) == len(self._handed[0]) and all(
                a is b for a, b in zip(handed, self._handed[0])):
            rows = self._handed[1]  # the very tensors of the last call: same rows, the layers' caches hold
        else:
            rows = read_rows(image_embeds) if image_embeds is not None else None
            if rows is not None:
                guided = bool(self.cfg_hint()) if self.cfg_hint is not None else True
                rows = [call_rows(r, batch, guided) for r in rows]
            if keep:
                self._handed = (handed, rows) if rows is not None else None
        if rows is None and self.expected_rows is not None and batch and \
                all(batch % r.shape[0] == 0 for r in self.expected_rows):
            rows = self.expected_rows
        if rows is not None and len(rows) != len(self.states):
            raise IPAdapterError(
                f"the pipeline handed image-prompt rows for {len(rows)} adapter(s); {len(self.states)} attached "
                "(give ip.pipeline_kwargs() of this very IPAdapter)"
            )
        for i, state in enumerate(self.states):
            state.call_rows = rows[i] if rows is not None else None


def caching() -> bool:
    """Whether layouts computed for one denoiser call may be kept for the next (same generation): not while
    training (they carry gradients), and not under torch.compile, where the graph recomputes them for nothing
    and a cache filled at step 1 would change the path traced at step 2 (a recompile)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def call_progress(timestep, num_train_timesteps: int) -> float | torch.Tensor:
    """1 - t / T for a denoiser call's timestep, clamped to [0, 1]: a float in eager mode (reading a GPU tensor
    waits for the GPU: callers ask only under a schedule). Under torch.compile a 0-d float32 tensor on the
    timestep's device, computed in the graph: ``.item()`` would break the graph, and the float it gives would be
    baked in as a constant, so every step (a new timestep) would compile again."""
    if torch.compiler.is_compiling():
        t = torch.as_tensor(timestep).flatten()[0].float()
        return (1.0 - t / num_train_timesteps).clamp(0.0, 1.0)
    t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
    return min(max(1.0 - t / num_train_timesteps, 0.0), 1.0)


def is_zero(scale: float | torch.Tensor) -> bool:
    """Whether a weight is known to be 0 without reading a tensor (a traced weight never is: its layer computes)."""
    return not torch.is_tensor(scale) and scale == 0


def is_one(scale: float | torch.Tensor) -> bool:
    return not torch.is_tensor(scale) and scale == 1


KV_SCALINGS: tuple[str, ...] = ("v", "kv", "kv-penalty", "k-mean-v-penalty")


def scale_keys_values(k: torch.Tensor, v: torch.Tensor, scale: float | torch.Tensor,
                      mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's embeds_scaling on one layer's image K/V [b, tokens, W] (``v``, "V only", scales the output
    instead and never comes here): ``kv`` K and V times the scale; ``kv-penalty`` the same with the scale times
    W / 1280 (the layer width over SDXL's widest); ``k-mean-v-penalty`` that scale on K and on V's mean over the
    tokens only (V - mean(V) + scale * mean(V))."""
    if mode in ("kv-penalty", "k-mean-v-penalty"):
        scale = scale * (k.shape[-1] / 1280.0)
    if mode == "k-mean-v-penalty":
        mean = v.mean(dim=1, keepdim=True)
        return k * scale, (v - mean) + mean * scale
    return k * scale, v * scale


class AdapterSlots(nn.Module):
    """What every family's attention processor holds: its layer index, the runtime, and per attached adapter its
    layer weights and state (added on attach, removed on detach)."""

    def __init__(self, index: int, runtime: Runtime):
        super().__init__()
        self.index = index
        self.runtime = runtime
        self.layers = nn.ModuleList()
        self.states: list[AdapterState] = []

    def add(self, layer: nn.Module, state: AdapterState) -> None:
        self.layers.append(layer)
        self.states.append(state)

    def remove(self, state: AdapterState) -> None:
        keep = [(layer, s) for layer, s in zip(self.layers, self.states) if s is not state]
        self.layers = nn.ModuleList([layer for layer, _ in keep])
        self.states = [s for _, s in keep]


def attend(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, head_dim: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    b = query.shape[0]
    k = k.view(b, -1, heads, head_dim).transpose(1, 2)
    v = v.view(b, -1, heads, head_dim).transpose(1, 2)
    if k.dtype != query.dtype or v.dtype != query.dtype:  # no no-op casts: each costs dispatch time per layer and step
        k, v = k.to(query.dtype), v.to(query.dtype)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * head_dim)


def layer_masks(masks: torch.Tensor, seq: int, latent_hw: tuple[int, int] | None) -> torch.Tensor:
    """Grayscale masks [n, H, W] resized (area average) to a layer's token grid, flattened to [n, seq]."""
    h, w = latent_hw or (int(math.isqrt(seq)), int(math.isqrt(seq)))
    factor = 1
    while math.ceil(h / factor) * math.ceil(w / factor) > seq:
        factor *= 2
    lh, lw = math.ceil(h / factor), math.ceil(w / factor)
    if lh * lw != seq:
        lh = lw = int(math.isqrt(seq))
    resized = F.interpolate(masks[:, None].float(), size=(lh, lw), mode="area")
    return resized.flatten(1).clamp(0, 1)
