"""The SD3 family: ``SD3Transformer2DModel`` (SD3 / SD3.5) and the InstantX SD3.5 IP-Adapter ("time-plus" kind).

How the image prompt reaches the joint blocks, following diffusers' SD3 IP-Adapter:

- The pipeline is handed the SigLIP features as ``ip_adapter_image_embeds`` ([negative; positive] under guidance)
  and lays them out for its own batch; ``SD3Transformer2DModel.forward`` calls ``self.image_proj(embeds, timestep)``
  once per step. Attaching sets that attribute to :class:`StepTokens` (a plain attribute, not a submodule, removed
  on detach), which runs the time-conditioned resampler and then every block's AdaLN + image K/V at once: the
  tokens depend on the timestep, so once per step for all blocks together.
- :class:`JointIPProcessor` is diffusers' ``JointAttnProcessor2_0`` op for op, plus, when this call's tokens are
  there and the scale is not 0: the image-stream queries (RMS-normed) attend over [image-stream keys (RMS-normed);
  image-prompt keys] with values [image-stream values; image-prompt values], text tokens excluded; the result
  times the scale is added before ``to_out``, on every joint block including the last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import AdapterSlots, AdapterState, Runtime, call_progress, is_zero
from ..core.config import AdapterConfig
from ..core.errors import IPAdapterError
from .base import (
    BaseFamily,
    CallFacts,
    FlowSchedule,
    Layer,
    TrainingParts,
    flow_matching,
    load_flow_model,
    saved_without,
)


class StepTokens:
    """``transformer.image_proj`` while a time-plus adapter is attached: features + timestep -> every block's K/V.

    ``embeds``: the rows the pipeline laid out, [rows, S, H] (one image each) or [rows, n, S, H] (n images each,
    whose tokens are concatenated). Returns (tokens, time embedding) as diffusers' resampler does; the transformer
    hands them to every processor, which uses them as the sign that this call carries an image prompt.
    """

    def __init__(self, states: list[AdapterState], runtime: Runtime):
        self.states = states
        self.runtime = runtime

    def __call__(self, embeds: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        state = self.states[0]
        # the denoising progress only matters under start/end or a curve (reading it syncs a GPU)
        # (under torch.compile a 0-d tensor, and so are the scheduled scales: core.attention.call_progress)
        progress = call_progress(timestep, self.runtime.num_train_timesteps) if state.schedule is not None else 0.0
        state.kv = {}  # a new dict, not the last step's emptied (under torch.compile its keys are guarded)
        state.step_scales = {i: state.effective_scale(i, progress) for i in state.layers}
        if all(is_zero(s) for s in state.step_scales.values()):  # scale 0, or outside start..end: no resampler
            state.step_tokens = None
            return embeds, None
        rows = embeds.shape[0]
        if state.step_sets is not None:
            embeds = own_sets(embeds, *state.step_sets)
        n = embeds.shape[1] if embeds.ndim == 4 else 1
        flat = embeds.reshape(rows * n, *embeds.shape[-2:])
        times = timestep.repeat_interleave(n) if n > 1 else timestep
        tokens, temb = state.projection(flat, times)
        if n > 1:
            tokens, temb = tokens.reshape(rows, n * tokens.shape[1], tokens.shape[2]), temb[::n]
        state.step_tokens = tokens
        for index, layer in state.layers.items():
            if not is_zero(state.step_scales[index]):  # a zero block scale costs nothing, as in diffusers
                state.kv[index] = layer.keys_values(tokens, temb)
        return tokens, temb


IMAGE_KEY_GAIN = 8.0  # a fresh adapter's image keys against the latent ones (see SD3Family.init_kv)


def own_sets(embeds: torch.Tensor, sets: int, branches: int) -> torch.Tensor:
    """[rows, sets x n, S, H] (every row all sets' features, as the pipeline tiled them) -> [rows, n, S, H], each
    row its own prompt's set. The pipeline's rows are ``branches`` blocks ([negative; positive]) of prompts x
    images per prompt, prompt-major (each prompt's images together), as SD3 pipelines repeat their prompt embeds."""
    if embeds.ndim == 3:  # one set of one image
        embeds = embeds[:, None]
    rows = embeds.shape[0]
    per_branch = rows // branches
    if embeds.ndim != 4 or rows % branches or per_branch % sets or embeds.shape[1] % sets:
        raise IPAdapterError(f"image sets: {sets} set(s) of image features for a pipeline batch of {rows} row(s) "
                             f"with {embeds.shape[1] if embeds.ndim == 4 else 1} feature(s) each; give one image "
                             "set per text prompt")
    per_prompt = per_branch // sets
    index = (torch.arange(rows, device=embeds.device) % per_branch) // per_prompt
    grouped = embeds.unflatten(1, (sets, embeds.shape[1] // sets))
    return grouped[torch.arange(rows, device=embeds.device), index]


class JointIPProcessor(AdapterSlots):
    """Attention processor of one joint block (or dual-attention ``attn2``) with a time-plus adapter's weights."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ip_hidden_states=None,
                 temb=None):
        # spelled out: diffusers' Attention passes a processor only the keywords its __call__ names
        return self.forward(attn, hidden_states, encoder_hidden_states, attention_mask, ip_hidden_states, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ip_hidden_states=None,
                temb=None):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        img_query, img_key, img_value = query, key, value
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            ctx = [attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                   attn.add_v_proj(encoder_hidden_states)]
            ctx_q, ctx_k, ctx_v = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in ctx)
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        if ip_hidden_states is not None:
            hidden_states = self._add_image_attention(hidden_states, ip_hidden_states, img_query, img_key, img_value)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _add_image_attention(self, hidden_states, tokens, img_query, img_key, img_value):
        for layer, state in zip(self.layers, self.states):
            kv = state.kv.get(self.index)
            if kv is None or state.step_tokens is not tokens:  # no prompt this call, or a zero scale
                continue
            ip_key, ip_value = kv
            b = img_query.shape[0]
            if ip_key.shape[0] != b:
                raise ValueError(f"SD3 batch of {b} rows got image-prompt rows for {ip_key.shape[0]}")
            query = layer.norm_q(img_query)
            key = torch.cat([layer.norm_k(img_key), ip_key.to(img_key.dtype)], dim=2)
            value = torch.cat([img_value, ip_value.to(img_value.dtype)], dim=2)
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]).to(query.dtype)
            hidden_states = hidden_states + out * state.step_scales[self.index]
        return hidden_states


# ------------------------------------------------------------------------------------------------ family
#: new SD3.5 adapters: InstantX's shapes (64 tokens, resampler width 1280, 20 heads x 64, depth 4, 320 sinusoids)
NEW_ADAPTER = dict(num_tokens=64, resampler_dim=1280, resampler_depth=4, resampler_dim_head=64, resampler_ff_mult=4,
                   time_embed_dim=320)


def _install_step_tokens(denoiser: nn.Module, processors: dict) -> None:
    """``transformer.image_proj`` is our :class:`StepTokens` while any joint block has adapter weights (a plain
    attribute shadowing nothing diffusers put there: removed again, the transformer is the base model)."""
    mine = [p for p in processors.values() if isinstance(p, JointIPProcessor) and p.states]
    current = denoiser.__dict__.get("image_proj")
    if mine:
        states = list(dict.fromkeys(s for p in mine for s in p.states))
        object.__setattr__(denoiser, "image_proj", StepTokens(states, mine[0].runtime))
    elif isinstance(current, StepTokens):
        del denoiser.__dict__["image_proj"]


class SD3Family(BaseFamily):
    name = "sd3"
    title = "SD3 / SD3.5 transformers"
    denoiser_attr = "transformer"

    def recognises(self, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "SD3Transformer2DModel"

    def recognises_index(self, model_index: dict) -> bool:
        entry = model_index.get("transformer")
        return isinstance(entry, list) and len(entry) == 2 and entry[1] == "SD3Transformer2DModel"

    def label(self, denoiser: nn.Module) -> str:
        c = denoiser.config
        width = c.num_attention_heads * c.attention_head_dim
        if c.num_layers == 38 and width == 2432:
            return "SD3.5 Large"
        if c.num_layers == 24 and width == 1536:
            return "SD3.5 Medium" if c.dual_attention_layers else "SD3 Medium"
        return "SD3-family transformer"

    def describe(self, denoiser: nn.Module) -> str:
        c = denoiser.config
        width = c.num_attention_heads * c.attention_head_dim
        return f"{self.label(denoiser)}, {c.num_layers} joint blocks, width {width}"

    def layers(self, denoiser: nn.Module) -> list[Layer]:
        """Every attention processor in diffusers' order (one per joint block; dual-attention blocks add attn2),
        as diffusers' loader numbers the "ip_adapter.<i>" keys."""
        layers = []
        for index, name in enumerate(denoiser.attn_processors):
            attn = denoiser.get_submodule(name[: -len(".processor")])
            layers.append(Layer(index, name, attn.to_k.out_features, attn.to_k.in_features))
        return layers

    def processor(self, layer: Layer, runtime: Runtime) -> nn.Module:
        return JointIPProcessor(layer.index, runtime)

    def install(self, denoiser: nn.Module, processors: dict) -> None:
        denoiser.set_attn_processor(dict(processors))
        _install_step_tokens(denoiser, processors)

    def read_call(self, args: tuple, kwargs: dict) -> CallFacts:
        sample = args[0] if args else kwargs.get("hidden_states")
        timestep = args[3] if len(args) > 3 else kwargs.get("timestep")
        hw = (int(sample.shape[-2]), int(sample.shape[-1])) if sample is not None else None
        return CallFacts(latent_hw=hw, timestep=timestep)

    # ------------------------------------------------------------------------------------ fitting adapters
    def check(self, config: AdapterConfig, denoiser: nn.Module, source: str = "adapter") -> None:
        here = self.describe(denoiser)
        if not config.time_conditioned:
            raise IPAdapterError(f"{source}: {config.describe()}; this model: {here} (SD3 takes SD3.5 adapters)")
        layers = self.layers(denoiser)
        c = denoiser.config
        if sorted(config.layer_widths) != [layer.index for layer in layers] or \
                any(config.layer_widths[layer.index] != layer.width for layer in layers) or \
                config.cross_attention_dim != layers[0].width:
            raise IPAdapterError(f"{source}: {config.describe()}; this model: {here}")
        if config.head_dim != c.attention_head_dim:
            raise IPAdapterError(f"{source}: image-attention norms of width {config.head_dim}; this model's heads are "
                                 f"{c.attention_head_dim} wide ({here})")
        others = [s for s in _attached_states(denoiser) if s.projection is not None]
        if others:
            raise IPAdapterError(f"{source}: an SD3.5 adapter is already attached; one at a time on SD3 "
                                 "(its tokens come in the pipeline's one ip_adapter_image_embeds)")

    def new_config(self, denoiser: nn.Module, kind: str, embed_dim: int, num_tokens: int | None = None,
                   **overrides) -> AdapterConfig:
        if kind != "time-plus":
            raise IPAdapterError(f"kind {kind!r}: SD3 adapters are of the time-plus kind (InstantX SD3.5 layout)")
        layers = self.layers(denoiser)
        shape = dict(NEW_ADAPTER, **overrides)
        shape.setdefault("resampler_heads", max(shape["resampler_dim"] // shape["resampler_dim_head"], 1))
        if num_tokens:
            shape["num_tokens"] = num_tokens
        return AdapterConfig(kind="time-plus", embed_dim=embed_dim, cross_attention_dim=layers[0].width,
                             layer_widths={layer.index: layer.width for layer in layers},
                             head_dim=denoiser.config.attention_head_dim, base_family="sd3", **shape)

    def init_kv(self, adapter, denoiser: nn.Module) -> None:
        """A fresh adapter starts near the frozen base: image K as the block's context (text) K, with the image-key
        norm IMAGE_KEY_GAIN times the block's, and image V zero; the other QK norms as the block's; AdaLN at identity.

        InstantX's image attention attends over the latent tokens' own keys and values as well as the image tokens'
        and adds the result to the block, so an adapter that copied the text K/V (the UNet recipe) would start by
        adding a second self-attention at full strength: on the world's transformer member that doubled the base's
        flow-matching loss (0.25 -> 0.49 on a batch) and training spent its steps undoing it. Zero image values and
        keys that outweigh the latent ones make most of the attention land on tokens that add nothing (0.39 at
        the start); the image tokens' values then grow from there."""
        for layer in self.layers(denoiser):
            ip = adapter.ip_adapter[str(layer.index)]
            attn = denoiser.get_submodule(layer.module_name)
            k = attn.add_k_proj if attn.add_k_proj is not None else attn.to_k
            with torch.no_grad():
                ip.to_k_ip.weight.copy_(k.weight)
                ip.to_v_ip.weight.zero_()
                for mine, theirs in ((ip.norm_q, attn.norm_q), (ip.norm_k, attn.norm_k),
                                     (ip.norm_ip_k, attn.norm_added_k or attn.norm_k)):
                    if getattr(theirs, "weight", None) is not None:
                        mine.weight.copy_(theirs.weight)
                if getattr(ip.norm_ip_k, "weight", None) is not None:
                    ip.norm_ip_k.weight.mul_(IMAGE_KEY_GAIN)
                ip.norm_ip.linear.weight.zero_()
                ip.norm_ip.linear.bias.zero_()

    # ------------------------------------------------------------------------------------------ generation
    def preset_blocks(self, layers: list[Layer], preset: str) -> list[str]:
        raise IPAdapterError(f"--blocks {preset}: the style/composition presets are UNet blocks; on SD3 name joint "
                             "blocks (e.g. transformer_blocks.10=0.5,*=1)")

    def pipeline_class(self, pipe, mode: str, controlnet: bool) -> type:
        import diffusers

        if controlnet:
            if mode != "txt2img":
                raise IPAdapterError(f"SD3 with a ControlNet serves text-to-image only here, not {mode}")
            return diffusers.StableDiffusion3ControlNetPipeline
        kind = {"txt2img": "", "img2img": "Img2Img", "inpaint": "Inpaint"}[mode]
        return getattr(diffusers, f"StableDiffusion3{kind}Pipeline")

    def default_size(self, pipe) -> int:
        return int(pipe.transformer.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    # -------------------------------------------------------------------------------------------- training
    default_kind = "time-plus"
    default_timestep_sampling = "logit_normal"  # diffusers' SD3 training example's default weighting_scheme

    def load_training_parts(self, path, device: torch.device) -> TrainingParts:
        """The frozen transformer and its flow-matching schedule (the scheduler's shifted sigmas)."""
        import json
        from pathlib import Path

        from diffusers import SD3Transformer2DModel

        transformer, scheduler = load_flow_model(path, SD3Transformer2DModel, "SD3", device)
        index = json.loads((Path(path) / "model_index.json").read_text())
        t5 = bool((index.get("text_encoder_3") or [None])[0])
        return TrainingParts(transformer, self.label(transformer), None, "flow",
                             {"t5": t5, "joint_dim": int(transformer.config.joint_attention_dim)},
                             FlowSchedule.from_scheduler(scheduler, device))

    def load_text_encoders(self, path, extra: dict) -> tuple[list, list]:
        """CLIP-L and CLIP-G (penultimate states + pooled), and T5 when the folder has it."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        names = ("", "_2", "_3") if extra.get("t5") else ("", "_2")
        tokenizers = [AutoTokenizer.from_pretrained(str(path), subfolder=f"tokenizer{n}") for n in names]
        encoders = [CLIPTextModelWithProjection.from_pretrained(str(path), subfolder=f"text_encoder{n}")
                    for n in names[:2]]
        if extra.get("t5"):
            tokenizers[2].model_max_length = int(extra.get("max_sequence_length", 77))
            encoders.append(T5EncoderModel.from_pretrained(str(path), subfolder="text_encoder_3"))
        return tokenizers, encoders

    @torch.no_grad()
    def encode_text(self, encoders, ids, device, extra: dict) -> dict:
        """StableDiffusion3Pipeline's conditioning: both CLIPs' penultimate states side by side, zero-padded to the
        T5 width, then T5's sequence (``max_sequence_length`` zeros without T5); the two pooled outputs side by side."""
        states, pooled = [], []
        for encoder, tokens in zip(encoders[:2], ids[:2]):
            out = encoder(tokens.to(device), output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, -1)
        joint = int(extra["joint_dim"])
        if len(encoders) > 2:
            t5 = encoders[2](ids[2].to(device))[0]
        else:
            length = int(extra.get("max_sequence_length", 77))
            t5 = torch.zeros(clip.shape[0], length, joint, device=clip.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, joint - clip.shape[-1]))
        return {"text": torch.cat([clip, t5.to(clip.dtype)], dim=-2).float(), "pooled": torch.cat(pooled, -1).float()}

    def added_conditioning(self, feats: dict, uncond: dict, drop_text: torch.Tensor, dtype, extra: dict) -> dict:
        pooled = torch.where(drop_text[:, None], uncond["pooled"].to(feats["pooled"]), feats["pooled"])
        return {"pooled_projections": pooled.to(dtype)}

    def latent_multiple(self, denoiser: nn.Module) -> int:
        return int(denoiser.config.patch_size)

    def text_elements(self, denoiser: nn.Module, extra: dict) -> int:
        c = denoiser.config
        return (77 + int(extra.get("max_sequence_length", 77))) * int(c.joint_attention_dim) + \
            int(c.pooled_projection_dim)

    def cache_facts(self, extra: dict) -> dict:
        return {"max_sequence_length": int(extra.get("max_sequence_length", 77)), "t5": bool(extra.get("t5"))}

    def diffuse(self, x0: torch.Tensor, d: dict, m) -> tuple:
        return flow_matching(x0, d, m.schedule, m.extra.get("objective", {}))

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                added: dict | None, image: torch.Tensor, extra: dict) -> torch.Tensor:
        """The pipeline's transformer call; the SigLIP features go in as ``ip_adapter_image_embeds``, so the
        transformer runs the time-conditioned resampler (:class:`StepTokens`) on this very timestep."""
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text,
                        pooled_projections=added["pooled_projections"],
                        joint_attention_kwargs={"ip_adapter_image_embeds": image}, return_dict=False)[0]

    def validation_pipeline(self, path, denoiser: nn.Module, extra: dict, frozen):
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), **{**saved_without(path), "transformer": denoiser,
                                                        "image_encoder": None, "feature_extractor": None})
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                frozen(getattr(pipe, name))
        return pipe


def _attached_states(denoiser: nn.Module) -> list[AdapterState]:
    image_proj = denoiser.__dict__.get("image_proj")
    return list(image_proj.states) if isinstance(image_proj, StepTokens) else []


SD3 = SD3Family()
