"""The base-family seam: the registry finds families, a new family is one class + one registry line, one vocabulary."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention
from torch import nn

import ipadapter.bases as bases
from ipadapter.bases.base import BaseFamily, CallFacts, Layer
from ipadapter.bases.unet import UNET, IPAttnProcessor
from ipadapter.core.adapter import Adapter
from ipadapter.core.config import AdapterConfig, family_label
from ipadapter.core.errors import IPAdapterError


def test_the_registry_finds_the_unet_family(sd15_pipe, sdxl_pipe):
    for pipe in (sd15_pipe, sdxl_pipe):
        assert bases.family_of(pipe) is UNET
        assert bases.family_of(pipe.unet) is UNET
        assert bases.denoiser_of(pipe) is pipe.unet
    assert bases.family_for_index({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"]}) is UNET
    assert bases.family_for_index({"_class_name": "Other", "vae": ["diffusers", "x"]}) is None


def test_a_model_no_family_serves_is_one_line():
    with pytest.raises(IPAdapterError) as e:
        bases.family_of(nn.Linear(2, 2))
    assert "\n" not in str(e.value) and "Linear" in str(e.value) and UNET.title in str(e.value)


class TinyTransformer(nn.Module, AttentionMixin):
    """A made-up denoiser: blocks of cross-attention over text tokens of width 16."""

    def __init__(self, blocks: int = 3, width: int = 32, text: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": Attention(width, cross_attention_dim=text, heads=2,
                                                                      dim_head=16)}) for _ in range(blocks))

    def forward(self, x, text, timestep=None):
        for block in self.blocks:
            x = x + block["attn"](x, encoder_hidden_states=text)
        return x


class TinyFamily(BaseFamily):
    """The smallest family module (docs/architecture.md shows the same one)."""

    name, title, denoiser_attr = "tiny", "Tiny transformers", "transformer"

    def recognises(self, denoiser):
        return isinstance(denoiser, TinyTransformer)

    def label(self, denoiser):
        return f"Tiny, {len(denoiser.blocks)} blocks"

    def layers(self, denoiser):
        return [Layer(i, f"blocks.{i}.attn.processor", 32, 16) for i in range(len(denoiser.blocks))]

    def processor(self, layer, runtime):
        return IPAttnProcessor(layer.index, runtime)

    def read_call(self, args, kwargs):
        return CallFacts(timestep=kwargs.get("timestep"))

    def check(self, config, denoiser, source="adapter"):
        if set(config.layer_widths) != {layer.index for layer in self.layers(denoiser)}:
            raise IPAdapterError(f"{source}: {config.describe()}; this model: {self.describe(denoiser)}")


def test_a_new_family_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setattr(bases, "FAMILIES", (*bases.FAMILIES, TinyFamily()))
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x, text = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    with torch.no_grad():
        base = model(x, text)
    config = AdapterConfig(kind="global", num_tokens=4, cross_attention_dim=16, embed_dim=8,
                           layer_widths={0: 32, 1: 32, 2: 32})
    adapter = Adapter(config)
    own = dict(model.attn_processors)
    bases.attach(model, adapter)
    assert bases.family_of(model).name == "tiny" and bases.attached(model) == [adapter]
    assert all(isinstance(p, IPAttnProcessor) for p in model.attn_processors.values())
    with torch.no_grad():
        adapter.state.set_tokens(adapter.project(_features(2, 8)))
        adapter.state.scale = 0.0
        assert torch.equal(model(x, text), base)  # scale 0: the base model, bit for bit
        adapter.state.scale = 1.0
        assert not torch.allclose(model(x, text), base)  # the image prompt acts
    bases.detach(model)
    assert all(model.attn_processors[k] is v for k, v in own.items())  # the very processors come back
    with pytest.raises(IPAdapterError, match="this model: Tiny, 2 blocks"):
        bases.attach(TinyTransformer(blocks=2), Adapter(config))


def _features(n: int, width: int):
    from ipadapter.core.encoders import Features

    return Features(image_embeds=torch.randn(n, width))


def test_one_vocabulary_for_family_names(sd15_pipe, sdxl_pipe):
    assert UNET.label(sd15_pipe.unet) == family_label("custom")  # tiny random widths: not a public family
    assert family_label("sd15") == "SD 1.5" and family_label("sdxl") == "SDXL"
    config = AdapterConfig(kind="global", cross_attention_dim=768, layer_widths={1: 320}, base_family="sd15")
    assert "(SD 1.5)" in config.describe()
    from ipadapter import embedded_model
    from ipadapter.core.checkpoint import read_checkpoint
    from ipadapter.generation.pipeline import load_pipeline

    model, adapter = embedded_model()
    cfg, _ = read_checkpoint(adapter)
    unet = load_pipeline(model).unet
    assert UNET.label(unet) == family_label(cfg.base_family) == "custom UNet"
