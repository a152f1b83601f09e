"""Tiny random models from configs, shaped like the real ones: for tests, benchmarks and offline smoke runs.

Nothing here downloads anything. SD 1.5 shape: 16 cross-attention layers (3 cross-attention down blocks of 2,
3 up blocks of 3, 1 mid). SDXL shape: 70 (transformer depths 1/2/10 as in SDXL).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch


def tiny_tokenizer(folder: str | os.PathLike):
    """A character-level CLIPTokenizer written to ``folder`` (vocab covers lowercase text and digits)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))
    return tok


def tiny_unet(shape: str = "sd15", cross_dim: int = 32, widths: tuple[int, ...] | None = None, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if shape == "sd15":
        return UNet2DConditionModel(
            block_out_channels=widths or (32, 64, 64, 64), layers_per_block=2, sample_size=sample_size,
            in_channels=4, out_channels=4, cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    if shape == "sdxl":
        return UNet2DConditionModel(
            block_out_channels=widths or (32, 64, 64), layers_per_block=2, sample_size=sample_size, in_channels=4,
            out_channels=4, cross_attention_dim=cross_dim, attention_head_dim=(2, 4, 4), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + cross_dim // 2,
        )
    raise ValueError(f"unknown shape {shape!r}")


def tiny_image_encoder(hidden: int = 64, projection: int = 48, image_size: int = 32, patch: int = 8, layers: int = 3):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    cfg = CLIPVisionConfig(hidden_size=hidden, projection_dim=projection, image_size=image_size, patch_size=patch,
                           num_hidden_layers=layers, num_attention_heads=4, intermediate_size=hidden * 2)
    return CLIPVisionModelWithProjection(cfg).eval()


def tiny_feature_extractor(image_size: int = 32):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def tiny_pipeline(shape: str = "sd15", folder: str | os.PathLike | None = None, cross_dim: int | None = None,
                  with_image_encoder: bool = True, unet_widths: tuple[int, ...] | None = None):
    """A random StableDiffusion(XL)Pipeline; saved to ``folder`` (a diffusers model folder) when given."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok_dir = Path(tempfile.mkdtemp(prefix="ipadapter-tok-"))
    tokenizer = tiny_tokenizer(tok_dir)
    torch.manual_seed(2)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    encoder = tiny_image_encoder() if with_image_encoder else None
    fe = tiny_feature_extractor() if with_image_encoder else None

    def text_config(hidden: int, proj: int | None = None) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                              projection_dim=proj or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)

    if shape == "sd15":
        cross = cross_dim or 32
        unet = tiny_unet("sd15", cross, unet_widths)
        torch.manual_seed(3)
        text = CLIPTextModel(text_config(cross))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=fe, image_encoder=encoder,
                                       requires_safety_checker=False)
    else:
        cross = cross_dim or 64
        unet = tiny_unet("sdxl", cross, unet_widths)
        torch.manual_seed(3)
        text = CLIPTextModel(text_config(cross // 2))
        text2 = CLIPTextModelWithProjection(text_config(cross // 2, cross // 2))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         feature_extractor=fe, image_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def random_adapter(unet, kind: str = "global", encoder=None, seed: int = 0, **overrides):
    """An adapter shaped for ``unet`` and ``encoder`` with random (not text-copied) weights."""
    from .bases import new_adapter

    encoder = encoder or tiny_image_encoder()
    embed = encoder.config.projection_dim if kind == "global" else encoder.config.hidden_size
    if kind == "full":
        overrides.setdefault("num_tokens", (encoder.config.image_size // encoder.config.patch_size) ** 2 + 1)
    if kind == "plus":
        overrides.setdefault("num_tokens", 16)
        overrides.setdefault("resampler_dim", 64)
        overrides.setdefault("resampler_depth", 4)
    num_tokens = overrides.pop("num_tokens", None)
    torch.manual_seed(seed)
    adapter = new_adapter(unet, kind, embed_dim=embed, num_tokens=num_tokens, **overrides)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return adapter


# ------------------------------------------------------------------------------------------------- Flux
def tiny_t5_tokenizer(folder: str | os.PathLike | None = None):
    """A character-level T5 tokenizer (Unigram over lowercase letters, digits, a few signs), built offline."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ",.!?'-"]
    vocab += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    if folder is not None:
        tok.save_pretrained(str(folder))
    return tok


def tiny_flux_transformer(double: int = 2, single: int = 3, heads: int = 2, head_dim: int = 16,
                          joint_dim: int = 4096, pooled_dim: int = 32, guidance: bool = True):
    """A random ``FluxTransformer2DModel`` shaped like FLUX.1 (token width 4096, so diffusers reads XLabs v2's
    16 tokens from the 65,536 projection rows as it does for the real files), scaled down."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(5)
    third = head_dim // 4
    rope = (head_dim - 2 * (head_dim * 3 // 8), head_dim * 3 // 8, head_dim * 3 // 8) if head_dim >= 8 else (third,) * 3
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                  attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
                                  pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=rope)


def tiny_flux_pipeline(folder: str | os.PathLike | None = None, double: int = 2, single: int = 3,
                       with_image_encoder: bool = True, guidance: bool = True):
    """A random ``FluxPipeline`` (CLIP + T5 text encoders with offline tokenizers, a CLIP image encoder for XLabs
    adapters); 32 px images are 8 x 8 tokens. Saved to ``folder`` (a diffusers model folder) when given."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer(Path(tempfile.mkdtemp(prefix="ipadapter-tok-")))
    tokenizer_2 = tiny_t5_tokenizer()
    transformer = tiny_flux_transformer(double, single, guidance=guidance)
    torch.manual_seed(6)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                                        projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5_dim = transformer.config.joint_attention_dim
    text_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=t5_dim, d_kv=8, d_ff=32, num_layers=1,
                                     num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0))
    torch.manual_seed(7)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    encoder = tiny_image_encoder(projection=48) if with_image_encoder else None
    fe = tiny_feature_extractor() if with_image_encoder else None
    for model in (text, text_2, vae, transformer):
        model.eval()  # built from configs, they start in training mode (T5's dropout would make runs random)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tokenizer, text_encoder_2=text_2,
                        tokenizer_2=tokenizer_2, transformer=transformer, image_encoder=encoder, feature_extractor=fe)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


# ------------------------------------------------------------------------------------------------- SD3 family
def tiny_siglip_encoder(hidden: int = 48, image_size: int = 32, patch: int = 8, layers: int = 3):
    """A random ``SiglipVisionModel`` (InstantX SD3.5 reads its hidden_states[-2]) and its image processor."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(4)
    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                             num_attention_heads=4, image_size=image_size, patch_size=patch)
    return SiglipVisionModel(cfg).eval(), siglip_processor(image_size)


def siglip_processor(image_size: int):
    from .core.encoders import siglip_processor_class

    return siglip_processor_class()(size={"height": image_size, "width": image_size})


def tiny_sd3_transformer(num_layers: int = 3, heads: int = 4, head_dim: int = 8, text_dim: int = 64,
                         pooled_dim: int = 64, sample_size: int = 16, dual_attention_layers: tuple[int, ...] = ()):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(5)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, caption_projection_dim=heads * head_dim,
        joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=32,
        dual_attention_layers=dual_attention_layers, qk_norm="rms_norm",
    ).eval()


def tiny_sd3_pipeline(folder: str | os.PathLike | None = None, num_layers: int = 3, with_image_encoder: bool = True):
    """A random StableDiffusion3Pipeline: a few joint blocks, two tiny CLIP text towers and a tiny T5 (tokenizers
    built offline), a 4-channel VAE, flow-matching scheduler and a tiny SigLIP image encoder."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer(Path(tempfile.mkdtemp(prefix="ipadapter-tok-")))
    t5_tokenizer = tiny_t5_tokenizer(Path(tempfile.mkdtemp(prefix="ipadapter-t5tok-")))

    def clip(seed: int):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()

    text, text2 = clip(6), clip(7)
    torch.manual_seed(8)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_ff=128, d_kv=16, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0)).eval()
    torch.manual_seed(9)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035,
                        use_quant_conv=False, use_post_quant_conv=False)
    encoder, processor = tiny_siglip_encoder() if with_image_encoder else (None, None)
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(num_layers), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text, tokenizer=tokenizer, text_encoder_2=text2, tokenizer_2=tokenizer, text_encoder_3=t5,
        tokenizer_3=t5_tokenizer, image_encoder=encoder, feature_extractor=processor,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def random_flux_adapter(transformer, flavour: str = "xlabs", embed_dim: int = 48, num_tokens: int | None = None,
                        seed: int = 0, std: float = 0.2):
    """A random XLabs (double blocks, K/V with biases) or InstantX (double + single blocks, MLP projection)
    adapter shaped for ``transformer``."""
    from .core.adapter import Adapter
    from .core.config import AdapterConfig

    c = transformer.config
    width, joint = c.num_attention_heads * c.attention_head_dim, c.joint_attention_dim
    if flavour == "xlabs":
        layers = {i: width for i in range(c.num_layers)}
        config = AdapterConfig(kind="global", num_tokens=num_tokens or 4, embed_dim=embed_dim,
                               cross_attention_dim=joint, layer_widths=layers, flavour="xlabs", base_family="flux")
    else:
        layers = {i: width for i in range(c.num_layers + c.num_single_layers)}
        config = AdapterConfig(kind="mlp", num_tokens=num_tokens or 8, embed_dim=embed_dim, id_hidden_dim=2 * embed_dim,
                               cross_attention_dim=joint, layer_widths=layers, flavour="instantx", base_family="flux")
    torch.manual_seed(seed)
    adapter = Adapter(config)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            scale = std if not name.endswith("norm.weight") else 0.0
            p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    return adapter


def time_plus_config(transformer, embed_dim: int, num_tokens: int = 8, resampler_dim: int = 128, depth: int = 4,
                     time_embed_dim: int = 32):
    """The config of an InstantX-layout SD3.5 adapter for ``transformer`` (image attention on every processor; depth
    4, as diffusers always builds its resampler)."""
    from .core.config import AdapterConfig

    c = transformer.config
    width = c.num_attention_heads * c.attention_head_dim
    return AdapterConfig(kind="time-plus", num_tokens=num_tokens, cross_attention_dim=width, embed_dim=embed_dim,
                         layer_widths={i: width for i in range(len(transformer.attn_processors))},
                         resampler_dim=resampler_dim, resampler_depth=depth,
                         resampler_heads=max(resampler_dim // 64, 1), resampler_dim_head=64, resampler_ff_mult=4,
                         time_embed_dim=time_embed_dim,
                         head_dim=c.attention_head_dim, base_family="sd3")


def random_time_plus_adapter(transformer, encoder=None, seed: int = 0, **config):
    """A time-plus adapter shaped for ``transformer`` and a SigLIP ``encoder``, with random weights."""
    from .core.adapter import Adapter

    encoder = encoder if encoder is not None else tiny_siglip_encoder()[0]
    adapter = Adapter(time_plus_config(transformer, encoder.config.hidden_size, **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            noise = torch.randn_like(p) * 0.2
            p.copy_(1 + noise if name.endswith(("norm_q.weight", "norm_k.weight", "norm_ip_k.weight")) else noise)
    return adapter
