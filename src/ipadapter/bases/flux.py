"""FLUX.1 (``FluxTransformer2DModel``): XLabs v1/v2 and InstantX FLUX.1-dev adapters.

Layers. The official index ``i`` of a Flux adapter counts the blocks that take image attention: double block
``i`` (``transformer_blocks.i``) for ``i < n_double``, then single block ``i - n_double``. XLabs adapters use the
double blocks only (19 in FLUX.1), InstantX's all 57.

Attention (the facts: diffusers' ``FluxIPAdapterAttnProcessor`` for XLabs, the InstantX reference node for
InstantX). The image query is the block's query after its QK-norm and before RoPE, over the image stream (double
blocks) or over [text; image] (single blocks). XLabs: image keys/values with biases, no norm, no RoPE; the result
times the scale joins the image stream after the block's feed-forward (no gate, no ``to_out``), through the third
output diffusers' double block adds. InstantX: image keys/values without bias, each head RMS-normalised (no
weights, eps 1e-5), the result times the scale added to the attention output before ``to_out`` (double) or before
the block's ``proj_out`` (single: text tokens get it too). Several images of one adapter are one attention over
all their tokens; several adapters add up in order.

Speed. Image keys/values depend only on the image prompt: they are computed once per generation
(:meth:`AdapterState.set_tokens`) for both branches, not in every block at every step as diffusers does.

The pipeline's batch. FluxPipeline runs the conditional and (under true CFG) the unconditional pass as separate
transformer calls, handing each the branch's ``ip_adapter_image_embeds`` in ``joint_attention_kwargs``. The
generator hands it small row markers instead of embeddings (:func:`prompt_markers`): the forward pre-hook reads
from them which branch this call is and how many rows it has, and each block takes that branch's keys/values.
A call without markers (the pipeline driven by hand) gets the conditional image prompt on every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import AdapterSlots, AdapterState, Runtime, caching, is_one, is_zero
from ..core.config import AdapterConfig
from ..core.errors import IPAdapterError
from .base import (
    BaseFamily,
    CallFacts,
    FlowSchedule,
    Layer,
    TrainingParts,
    execution_device,
    flow_matching,
    load_flow_model,
)

#: marker widths: what a transformer call's ``ip_adapter_image_embeds`` rows say about the call
COND, UNCOND = 1, 2
MODES = {"txt2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}


def prompt_markers(branch: int, device=None) -> list[torch.Tensor]:
    """What the generator hands the pipeline as ``ip_adapter_image_embeds`` (COND) and as
    ``negative_ip_adapter_image_embeds`` (UNCOND): one [1, branch] marker (the pipeline repeats it to its batch),
    so a call's marker says its branch by its width, without reading any value (no device sync)."""
    return [torch.zeros(1, branch, device=device)]


def _rms(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm without weights over the last axis (InstantX's image K/V norms), computed in float32."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype)


class _PromptRows:
    """Stands where diffusers' pipelines look for ``transformer.encoder_hid_proj.num_ip_adapters`` (a plain object,
    not a submodule: the transformer's state dict does not change). The pre-hook takes the markers out of the call
    before the transformer would pass them here."""

    num_ip_adapters = 1  # the generator hands one marker per pipeline call, whatever the number of adapters

    def __call__(self, embeds):
        return embeds


class FluxIPProcessor(AdapterSlots):
    """Attention processor of one Flux block carrying one or more adapters' image K/V."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, index: int, single: bool, runtime: Runtime):
        super().__init__(index, runtime)
        self.single = single
        self.base = None  # the block's own processor, set when installed: it runs whenever no image acts

    def _acting(self) -> list[tuple[AdapterState, float | torch.Tensor, str]]:
        acting = []
        for state in self.states:
            if not state.active or self.index not in state.kv:
                continue
            progress = self.runtime.progress if state.schedule is not None else 0.0
            scale = state.effective_scale(self.index, progress)  # a 0-d tensor under torch.compile with a schedule
            if not is_zero(scale):
                acting.append((state, scale, getattr(state, "flavour", "xlabs")))
        return acting

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        acting = self._acting()
        if not acting:  # the base model, exactly: its own processor
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        def sdpa(q, k, v, mask=None):
            return dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend, parallel_config=self._parallel_config)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        ip_query = query  # after the QK-norm, before RoPE (and, in double blocks, over the image stream only)
        if encoder_hidden_states is not None:
            if getattr(attn, "fused_projections", False):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq, ek, ev = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                              attn.add_v_proj(encoder_hidden_states))
            eq = attn.norm_added_q(eq.unflatten(-1, (attn.heads, -1)))
            ek = attn.norm_added_k(ek.unflatten(-1, (attn.heads, -1)))
            query, key = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1)
            value = torch.cat([ev.unflatten(-1, (attn.heads, -1)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = sdpa(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
        before, after = self._image_attention(ip_query, attn.heads, acting, sdpa)
        if encoder_hidden_states is None:  # single block: the image attention joins before proj_out
            return out if before is None else out + before
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] -
                                            encoder_hidden_states.shape[1]], dim=1)
        if before is not None:
            image = image + before
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        text = attn.to_add_out(text.contiguous())
        return (image, text) if after is None else (image, text, after)

    def _image_attention(self, query, heads: int, acting, sdpa) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(added before to_out, added after the feed-forward): the sum over the acting adapters of scale x
        softmax(q k_img^T) v_img, per image under region masks."""
        before = after = None
        batch, seq = query.shape[:2]
        for state, scale, flavour in acting:
            k, v = branch_kv(state, self.index, self.runtime, batch, heads, rms=flavour == "instantx")
            masks = token_masks(state, self.runtime, seq, query) if state.masks is not None else None
            if masks is None:
                bias = None
                if state.image_weights is not None:  # weight w == the image given w times
                    bias = torch.log(state.image_weights.to(query)).repeat_interleave(k.shape[2])
                    bias = bias.view(1, 1, 1, -1)
                out = sdpa(query, k.flatten(1, 2), v.flatten(1, 2), bias)
                out = out.reshape(batch, seq, -1).to(query.dtype)
                out = out if is_one(scale) else scale * out
            else:
                out = None
                for j in range(k.shape[1]):
                    part = sdpa(query, k[:, j], v[:, j]).reshape(batch, seq, -1).to(query.dtype)
                    part = scale * part * masks[j, None, :, None]
                    out = part if out is None else out + part
            if flavour == "xlabs":
                after = out if after is None else after + out
            else:
                before = out if before is None else before + out
        return before, after


def branch_kv(state: AdapterState, index: int, runtime: Runtime, batch: int, heads: int,
              rms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """This block's image keys/values for the branch of the current call, as [batch, n_images, T, heads, d]
    (computed once per generation and branch; InstantX's RMS norms applied there too)."""
    branch = runtime.prompt_branch or COND
    key = ("flux", index, branch, batch)
    cached = state._expanded.get(key) if caching() else None
    if cached is not None:
        return cached
    k, v = state.kv[index]  # [rows, n, T, W]; rows = [uncond; cond] when the state has an unconditional branch
    half = state.rows // 2 if state.has_uncond else 0
    if branch == UNCOND and not state.has_uncond:
        raise IPAdapterError("the unconditional pass (true CFG) came, but the image prompt has no unconditional "
                             "branch; set it with its negative (set_images does)")
    pick = slice(0, half) if branch == UNCOND else slice(half, state.rows)
    k, v = k[pick], v[pick]
    if batch % k.shape[0]:
        raise IPAdapterError(f"transformer batch {batch} does not fit {k.shape[0]} image prompt(s)")
    k, v = (t.repeat_interleave(batch // t.shape[0], 0) if t.shape[0] != batch else t for t in (k, v))
    k, v = (t.unflatten(-1, (heads, -1)) for t in (k, v))
    if rms:
        k, v = _rms(k), _rms(v)
    if caching():
        state._expanded[key] = (k, v)
    return k, v


def token_masks(state: AdapterState, runtime: Runtime, seq: int, like: torch.Tensor) -> torch.Tensor:
    """Region masks [n_images, H, W] at the output size -> one weight per query token [n_images, seq]: image
    tokens read their mask at their own (row, col) position id; text tokens (single blocks) get 1."""
    ids = runtime.token_ids
    keep = not torch.compiler.is_compiling()  # (no gradients here: kept while training too)
    key = ("flux-masks", seq, None if ids is None or not keep else (ids.data_ptr(), tuple(ids.shape)))
    cached = state._expanded.get(key) if keep else None
    if cached is not None:
        return cached
    masks = state.masks.float()
    patch = runtime.patch or 16
    grid = (max(masks.shape[1] // patch, 1), max(masks.shape[2] // patch, 1))
    small = F.interpolate(masks[:, None], size=grid, mode="area")[:, 0].clamp(0, 1)
    if ids is None:
        raise IPAdapterError("region masks on Flux need the call's img_ids (the pipeline passes them)")
    rows = ids[:, 1].long().clamp(0, grid[0] - 1).to(small.device)
    cols = ids[:, 2].long().clamp(0, grid[1] - 1).to(small.device)
    image = small[:, rows, cols]  # [n, S_img]
    text = torch.ones(masks.shape[0], seq - image.shape[1], device=image.device)
    out = torch.cat([text, image], dim=1).to(like)
    if keep:
        state._expanded[key] = out
    return out


# ------------------------------------------------------------------------------------------------ family
def _counts(denoiser: nn.Module) -> tuple[int, int, int, int]:
    c = denoiser.config
    return (int(c.num_layers), int(c.num_single_layers), int(c.num_attention_heads * c.attention_head_dim),
            int(c.joint_attention_dim))


class FluxFamily(BaseFamily):
    name = "flux"
    title = "FLUX.1 transformers (XLabs and InstantX adapters)"
    denoiser_attr = "transformer"

    def recognises(self, denoiser: nn.Module) -> bool:
        return hasattr(denoiser, "single_transformer_blocks") and hasattr(denoiser, "transformer_blocks") and \
            "axes_dims_rope" in getattr(denoiser, "config", {})

    def recognises_index(self, model_index: dict) -> bool:
        return str(model_index.get("_class_name", "")).startswith("Flux")

    def label(self, denoiser: nn.Module) -> str:
        double, single, width, joint = _counts(denoiser)
        return "FLUX.1" if (double, single, width, joint) == (19, 38, 3072, 4096) else "custom Flux"

    def describe(self, denoiser: nn.Module) -> str:
        double, single, width, _ = _counts(denoiser)
        return f"{self.label(denoiser)}, {double} double + {single} single blocks, width {width}"

    def layers(self, denoiser: nn.Module) -> list[Layer]:
        double, single, width, joint = _counts(denoiser)
        out = [Layer(i, f"transformer_blocks.{i}.attn.processor", width, joint) for i in range(double)]
        out += [Layer(double + j, f"single_transformer_blocks.{j}.attn.processor", width, joint)
                for j in range(single)]
        return out

    def processor(self, layer: Layer, runtime: Runtime) -> nn.Module:
        runtime.num_train_timesteps = 1000
        return FluxIPProcessor(layer.index, layer.name.startswith("single_"), runtime)

    def install(self, denoiser: nn.Module, processors: dict) -> None:
        current = denoiser.attn_processors
        ours = 0
        for name, proc in processors.items():
            if isinstance(proc, FluxIPProcessor):
                ours += 1
                if proc.base is None:
                    own = current[name]
                    proc.base = own.base if isinstance(own, FluxIPProcessor) else own
                    proc._attention_backend = getattr(proc.base, "_attention_backend", None)
                    proc._parallel_config = getattr(proc.base, "_parallel_config", None)
        denoiser.set_attn_processor(processors)
        rows = getattr(denoiser, "encoder_hid_proj", None)
        if ours and not isinstance(rows, _PromptRows):
            if rows is not None:
                raise IPAdapterError("this transformer has diffusers' own IP-Adapter loaded; unload it first "
                                     "(pipe.unload_ip_adapter())")
            object.__setattr__(denoiser, "encoder_hid_proj", _PromptRows())
        elif not ours and isinstance(rows, _PromptRows):
            object.__delattr__(denoiser, "encoder_hid_proj")

    def read_call(self, args: tuple, kwargs: dict) -> CallFacts:
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        # the pipeline passes t / 1000: progress = 1 - t / num_train_timesteps as for every family
        facts = CallFacts(timestep=None if timestep is None else timestep * 1000, token_ids=kwargs.get("img_ids"))
        joint = kwargs.get("joint_attention_kwargs")
        markers = joint.pop("ip_adapter_image_embeds", None) if isinstance(joint, dict) else None
        if markers is not None:
            marker = markers[0] if isinstance(markers, (list, tuple)) else markers
            if not torch.is_tensor(marker) or marker.ndim != 2 or marker.shape[1] not in (COND, UNCOND):
                raise IPAdapterError("ip_adapter_image_embeds: with ipadapter's adapters attached, give image "
                                     "prompts through IPAdapter.set_images/generate, not the pipeline's own argument")
            facts.prompt_branch = int(marker.shape[1])
        return facts

    def check(self, config: AdapterConfig, denoiser: nn.Module, source: str = "adapter") -> None:
        double, single, width, joint = _counts(denoiser)
        want = {"xlabs": double, "instantx": double + single}.get(config.flavour)
        if want is None or config.num_layers != want or config.cross_attention_dim != joint or \
                any(w != width for w in config.layer_widths.values()):
            raise IPAdapterError(f"{source}: {config.describe()}; this model: {self.describe(denoiser)}"
                                 + ("" if config.cross_attention_dim == joint else
                                    f", token width {joint} (the adapter's: {config.cross_attention_dim})"))

    def pipeline_class(self, pipe, mode: str, controlnet: bool) -> type:
        import diffusers

        kontext = "Kontext" in type(pipe).__name__
        name = f"Flux{'Kontext' if kontext else ''}{'ControlNet' if controlnet else ''}{MODES[mode]}Pipeline"
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise IPAdapterError(f"{mode}{' with ControlNet' if controlnet else ''}: diffusers has no {name}")
        return cls

    def default_size(self, pipe) -> int:
        return int(getattr(pipe, "default_sample_size", 128)) * int(getattr(pipe, "vae_scale_factor", 8))

    default_guidance = 3.5  # FluxPipeline's guidance_scale (FLUX.1-dev's distilled guidance)

    def project(self, adapter, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        # one batch per branch, as FluxPipeline projects them (a matrix product's rounding depends on its rows)
        return adapter.project(cond), adapter.project(uncond)

    def call_kwargs(self, pipe) -> dict:
        """The row markers in place of the pipeline's image embeddings (see the module docstring)."""
        transformer = pipe.transformer
        attachment = getattr(transformer, "_ipadapter", None)
        if attachment is None:  # no adapter (the text-only baseline): the pipeline as it is, no image embeds
            return {}
        attachment.runtime.patch = int(getattr(pipe, "vae_scale_factor", 8)) * 2
        device = execution_device(transformer)  # (offloaded weights may be on meta)
        return {"ip_adapter_image_embeds": prompt_markers(COND, device),
                "negative_ip_adapter_image_embeds": prompt_markers(UNCOND, device)}


    def preset_blocks(self, layers: list[Layer], preset: str) -> list[str]:
        raise IPAdapterError(f"--blocks {preset!r}: Flux has no presets; give one scale per double block "
                             "(e.g. '1,1,0.5,...') or entries such as 'transformer_blocks.3=1,*=0'")

    def new_config(self, denoiser: nn.Module, kind: str, embed_dim: int, num_tokens: int | None = None,
                   **overrides) -> AdapterConfig:
        """A new adapter in the XLabs layout: a CLIP projected embedding -> ``num_tokens`` (4 as XLabs v1; v2 has
        16) tokens of the T5 width, image K/V with biases on every double block."""
        if kind != "global":
            raise IPAdapterError(f"kind {kind!r}: Flux adapters train in the XLabs layout, kind global (a CLIP "
                                 "ViT-L/14 projected embedding -> image tokens)")
        double, _, width, joint = _counts(denoiser)
        unknown = sorted(set(overrides) - {"num_tokens"})
        if unknown:
            raise IPAdapterError(f"adapter settings {', '.join(unknown)}: an XLabs Flux adapter has none besides "
                                 "num_tokens")
        return AdapterConfig(kind="global", num_tokens=num_tokens or 4, embed_dim=embed_dim, cross_attention_dim=joint,
                             layer_widths={i: width for i in range(double)}, flavour="xlabs", base_family="flux")

    def init_kv(self, adapter, denoiser: nn.Module) -> None:
        """Image K/V start as the double block's text K/V seen from the raw T5-wide tokens: the block's
        ``add_{k,v}_proj`` after the transformer's ``context_embedder`` (W = W_add W_ctx, b = W_add b_ctx + b_add),
        the paper's initialisation for keys that read T5-wide tokens directly."""
        ctx = denoiser.context_embedder
        with torch.no_grad():
            for index in adapter.config.layer_widths:
                attn = denoiser.transformer_blocks[index].attn
                ip = adapter.ip_adapter[str(index)]
                for mine, theirs in ((ip.to_k_ip, attn.add_k_proj), (ip.to_v_ip, attn.add_v_proj)):
                    w = theirs.weight.float()
                    mine.weight.copy_(w @ ctx.weight.float())
                    mine.bias.copy_(w @ ctx.bias.float() + theirs.bias.float())

    # -------------------------------------------------------------------------------------------- training
    def load_training_parts(self, path, device: torch.device) -> TrainingParts:
        """The frozen transformer and its flow-matching schedule (the scheduler's sigmas as built from its config,
        without the dynamic shift, as diffusers' Flux training examples use them)."""
        from diffusers import FluxTransformer2DModel

        transformer, scheduler = load_flow_model(path, FluxTransformer2DModel, "Flux", device)
        return TrainingParts(transformer, self.label(transformer), None, "flow", {},
                             FlowSchedule.from_scheduler(scheduler, device))

    def load_text_encoders(self, path, extra: dict) -> tuple[list, list]:
        """CLIP (its pooled output) and T5 (its sequence, ``max_sequence_length`` tokens)."""
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        tokenizers = [AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer"),
                      AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer_2")]
        tokenizers[1].model_max_length = int(extra.get("max_sequence_length", 77))
        encoders = [CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder"),
                    T5EncoderModel.from_pretrained(str(path), subfolder="text_encoder_2")]
        return tokenizers, encoders

    @torch.no_grad()
    def encode_text(self, encoders, ids, device, extra: dict) -> dict:
        """FluxPipeline's text conditioning: T5's last hidden state, CLIP's pooled output."""
        pooled = encoders[0](ids[0].to(device), output_hidden_states=False).pooler_output
        text = encoders[1](ids[1].to(device), output_hidden_states=False)[0]
        return {"text": text.float(), "pooled": pooled.float()}

    def added_conditioning(self, feats: dict, uncond: dict, drop_text: torch.Tensor, dtype, extra: dict) -> dict:
        pooled = torch.where(drop_text[:, None], uncond["pooled"].to(feats["pooled"]), feats["pooled"])
        return {"pooled_projections": pooled.to(dtype)}

    def train_resolution(self, denoiser: nn.Module, vae_factor: int) -> int:
        return 128 * vae_factor  # FluxPipeline's default_sample_size

    def latent_multiple(self, denoiser: nn.Module) -> int:
        return 2  # 2 x 2 latents are one token

    def text_elements(self, denoiser: nn.Module, extra: dict) -> int:
        c = denoiser.config
        return int(extra.get("max_sequence_length", 77)) * int(c.joint_attention_dim) + int(c.pooled_projection_dim)

    def cache_facts(self, extra: dict) -> dict:
        return {"max_sequence_length": int(extra.get("max_sequence_length", 77))}

    def diffuse(self, x0: torch.Tensor, d: dict, m) -> tuple:
        return flow_matching(x0, d, m.schedule, m.extra.get("objective", {}))

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                added: dict | None, image: torch.Tensor, extra: dict) -> torch.Tensor:
        """FluxPipeline's transformer call on 2 x 2-packed latents: image/text position ids, t / 1000, and the
        guidance embedding (``guidance_scale``) on guidance-distilled transformers; the prediction unpacked."""
        b, _, h, w = noisy.shape
        guidance = None
        if denoiser.config.guidance_embeds:
            value = float(extra.get("objective", {}).get("guidance_scale", 3.5))
            guidance = torch.full((b,), value, device=noisy.device, dtype=torch.float32)
        pred = denoiser(hidden_states=pack_latents(noisy), timestep=timesteps / 1000, guidance=guidance,
                        pooled_projections=added["pooled_projections"], encoder_hidden_states=text,
                        txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=text.dtype),
                        img_ids=latent_ids(h // 2, w // 2, noisy.device, text.dtype), return_dict=False)[0]
        return unpack_latents(pred, h, w)

    def validation_pipeline(self, path, denoiser: nn.Module, extra: dict, frozen):
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(path), transformer=denoiser, image_encoder=None,
                                            feature_extractor=None)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            frozen(getattr(pipe, name))
        return pipe


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, H/2 x W/2, 4C] tokens (each 2 x 2 patch one token, row-major), as FluxPipeline."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``h`` x ``w``."""
    b, _, packed = tokens.shape
    c = packed // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [rows x cols, 3] of the packed image tokens: (0, row, col)."""
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


FLUX = FluxFamily()
