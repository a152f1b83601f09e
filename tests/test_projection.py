"""Projections checked against the formulas written out by hand (float64, explicit softmax/LayerNorm/GELU)."""

from __future__ import annotations

import math

import pytest
import torch

from ipadapter.core.adapter import Adapter
from ipadapter.core.config import AdapterConfig
from ipadapter.core.encoders import Features
from ipadapter.core.errors import IPAdapterError
from ipadapter.core.projection import (
    FaceIDProjection,
    GlobalProjection,
    Resampler,
    TokenMLPProjection,
    build_projection,
)

C = 32  # token width (the UNet's cross-attention width)


def _randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, LayerNorm affine included, so a wrong use of any of them shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module.eval()


def _sd(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------- reference maths
def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def linear(x, sd, name, bias=True):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if bias else y


def softmax(x):
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_resampler(sd, prefix, latents, features, heads, dim_head, depth):
    """proj_in; per layer: latents attend to [features; latents] (pre-norms), feed-forward; proj_out; norm."""
    x = linear(features, sd, f"{prefix}proj_in")
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        xn = layer_norm(x, sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"])
        ln = layer_norm(latents, sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"])
        q = ln @ sd[p + "0.to_q.weight"].T
        k, v = (torch.cat([xn, ln], dim=-2) @ sd[p + "0.to_kv.weight"].T).chunk(2, dim=-1)
        b = q.shape[0]
        q, k, v = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
        attn = softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head)) @ v
        attn = attn.transpose(1, 2).reshape(b, -1, heads * dim_head)
        latents = attn @ sd[p + "0.to_out.weight"].T + latents
        h = layer_norm(latents, sd[p + "1.0.weight"], sd[p + "1.0.bias"])
        h = gelu(h @ sd[p + "1.1.weight"].T) @ sd[p + "1.3.weight"].T
        latents = h + latents
    out = linear(latents, sd, f"{prefix}proj_out")
    return layer_norm(out, sd[f"{prefix}norm_out.weight"], sd[f"{prefix}norm_out.bias"])


def ref_faceid_tokens(sd, face, num_tokens):
    x = linear(gelu(linear(face, sd, "proj.0")), sd, "proj.2").reshape(-1, num_tokens, C)
    return layer_norm(x, sd["norm.weight"], sd["norm.bias"])


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------------------- kinds
def test_global_is_linear_reshape_layernorm():
    proj = _randomised(build_projection(AdapterConfig(kind="global", num_tokens=4, cross_attention_dim=C,
                                                      embed_dim=48)))
    assert isinstance(proj, GlobalProjection)
    embeds = torch.randn(3, 48)
    sd = _sd(proj)
    want = layer_norm(linear(embeds.double(), sd, "proj").reshape(3, 4, C), sd["norm.weight"], sd["norm.bias"])
    _close(proj(embeds), want)


def test_full_is_a_per_token_mlp():
    proj = _randomised(build_projection(AdapterConfig(kind="full", num_tokens=17, cross_attention_dim=C,
                                                      embed_dim=64)))
    assert isinstance(proj, TokenMLPProjection)
    assert set(proj.state_dict()) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
                                      "proj.3.weight", "proj.3.bias"}
    feats = torch.randn(2, 17, 64)
    sd = _sd(proj)
    want = layer_norm(linear(gelu(linear(feats.double(), sd, "proj.0")), sd, "proj.2"),
                      sd["proj.3.weight"], sd["proj.3.bias"])
    _close(proj(feats), want)


@pytest.mark.parametrize(("dim", "heads", "dim_head", "depth"), [(64, 1, 64, 4), (128, 2, 64, 2), (64, 4, 16, 1)])
def test_plus_resampler(dim, heads, dim_head, depth):
    cfg = AdapterConfig(kind="plus", num_tokens=8, cross_attention_dim=C, embed_dim=40, resampler_dim=dim,
                        resampler_depth=depth, resampler_heads=heads, resampler_dim_head=dim_head)
    proj = _randomised(build_projection(cfg))
    assert isinstance(proj, Resampler)
    feats = torch.randn(2, 17, 40)
    sd = _sd(proj)
    want = ref_resampler(sd, "", sd["latents"].expand(2, -1, -1), feats.double(), heads, dim_head, depth)
    _close(proj(feats), want)
    keys = set(proj.state_dict())
    assert {"latents", "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_kv.weight",
            "layers.0.0.norm1.weight", "layers.0.1.1.weight", "layers.0.1.3.weight"} <= keys
    assert not any(k.endswith("to_q.bias") or k.endswith("to_kv.bias") or k.endswith("to_out.bias") for k in keys)


def test_faceid_mlp_layernorm():
    cfg = AdapterConfig(kind="faceid", num_tokens=4, cross_attention_dim=C, embed_dim=512, id_embed_dim=512,
                        id_hidden_dim=96)
    proj = _randomised(build_projection(cfg))
    assert isinstance(proj, FaceIDProjection)
    face = torch.randn(3, 512)
    _close(proj(face), ref_faceid_tokens(_sd(proj), face.double(), 4))


def test_faceid_portrait_several_faces_give_their_tokens_each():
    cfg = AdapterConfig(kind="faceid-portrait", num_tokens=16, cross_attention_dim=C, embed_dim=512,
                        id_embed_dim=512, id_hidden_dim=64, layer_widths={1: 32})
    adapter = Adapter(cfg)
    _randomised(adapter.image_proj)
    faces = torch.randn(5, 512)
    tokens = adapter.project(Features(face_id=faces))
    assert tokens.shape == (5, 16, C)
    _close(tokens, ref_faceid_tokens(_sd(adapter.image_proj), faces.double(), 16))


@pytest.mark.parametrize(("shortcut", "s_scale"), [(False, 1.0), (True, 1.0), (True, 0.4)])
def test_faceid_plus_resamples_clip_features_with_id_tokens_as_queries(shortcut, s_scale):
    cfg = AdapterConfig(kind="faceid-plus", num_tokens=4, cross_attention_dim=C, embed_dim=64, id_embed_dim=512,
                        id_hidden_dim=64, resampler_dim=C, resampler_depth=2, resampler_heads=2,
                        resampler_dim_head=16, layer_widths={1: 32}, shortcut=shortcut, s_scale=s_scale)
    adapter = Adapter(cfg)
    _randomised(adapter.image_proj)
    face, clip = torch.randn(2, 512), torch.randn(2, 17, 64)
    sd = _sd(adapter.image_proj)
    ids = ref_faceid_tokens(sd, face.double(), 4)
    out = ref_resampler(sd, "perceiver_resampler.", ids, clip.double(), 2, 16, 2)
    want = ids + s_scale * out if shortcut else out
    _close(adapter.project(Features(face_id=face, penultimate=clip)), want)
    with pytest.raises(IPAdapterError, match="face image"):
        adapter.project(Features(face_id=face))


# --------------------------------------------------------------------------------------- feature choice
@pytest.mark.parametrize(("kind", "reads"), [("global", "image_embeds"), ("plus", "penultimate"),
                                             ("full", "penultimate"), ("faceid", "face_id")])
def test_each_kind_reads_its_feature(kind, reads):
    base = dict(num_tokens=4, cross_attention_dim=C, layer_widths={1: 32})
    extra = {
        "global": dict(embed_dim=48),
        "plus": dict(embed_dim=64, resampler_dim=64, resampler_depth=1, resampler_heads=1),
        "full": dict(embed_dim=64),
        "faceid": dict(embed_dim=512, id_embed_dim=512, id_hidden_dim=64),
    }[kind]
    adapter = Adapter(AdapterConfig(kind=kind, **base, **extra))
    given = {"image_embeds": torch.randn(2, 48), "penultimate": torch.randn(2, 17, 64),
             "face_id": torch.randn(2, 512)}
    tokens = adapter.project(Features(**given))
    assert tokens.shape[0] == 2 and tokens.shape[-1] == C
    with pytest.raises(IPAdapterError, match=reads):
        adapter.project(Features(**{k: v for k, v in given.items() if k != reads}))
