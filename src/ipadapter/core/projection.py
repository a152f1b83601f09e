"""Projections: image-encoder features -> image tokens. One builder picks the module from the config.

Parameter names follow the official checkpoint layout ("image_proj.*" keys) exactly, so a module's
``state_dict()`` is the file's tensors with no renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig


class GlobalProjection(nn.Module):
    """Projected CLIP embedding [B, E] -> Linear -> N tokens of width C -> LayerNorm (the paper's adapter)."""

    def __init__(self, embed_dim: int, width: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.width = num_tokens, width
        self.proj = nn.Linear(embed_dim, num_tokens * width)
        self.norm = nn.LayerNorm(width)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(embeds.shape[0], self.num_tokens, self.width))


class TokenMLPProjection(nn.Module):
    """Per-token MLP over all patch features (the "full" / full-face kind): H -> H -> GELU -> C -> LayerNorm."""

    def __init__(self, embed_dim: int, width: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, width), nn.LayerNorm(width)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.to(self.proj[0].weight.dtype))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverAttention(nn.Module):
    """Latents attend to [features, latents] (keys/values are both, concatenated); no biases."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        b = latents.shape[0]
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class PerceiverStack(nn.Module):
    """proj_in -> depth x (attention, feed-forward) with residuals -> proj_out -> norm_out."""

    def __init__(self, embed_dim: int, dim: int, out_dim: int, depth: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features.to(self.proj_in.weight.dtype))
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverStack):
    """The "plus" kind: Q learned queries resample all patch features (no positional embedding)."""

    def __init__(self, embed_dim: int, dim: int, out_dim: int, depth: int, heads: int, dim_head: int,
                 ff_mult: int, num_queries: int):
        super().__init__(embed_dim, dim, out_dim, depth, heads, dim_head, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(self.latents.expand(features.shape[0], -1, -1), features)


class FaceIDProjection(nn.Module):
    """FaceID: 512-d face embedding -> MLP -> N tokens -> LayerNorm; optionally resampled over CLIP patches.

    With ``perceiver`` (FaceID-Plus/PlusV2) the ID tokens are the queries of a resampler over the face crop's
    penultimate CLIP features; PlusV2 adds the ID tokens back with weight ``s_scale`` (``shortcut``).
    """

    def __init__(self, id_dim: int, hidden: int, width: int, num_tokens: int, perceiver: PerceiverStack | None):
        super().__init__()
        self.num_tokens, self.width = num_tokens, width
        self.proj = nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * width))
        self.norm = nn.LayerNorm(width)
        if perceiver is not None:
            self.perceiver_resampler = perceiver
        self.shortcut = False
        self.s_scale = 1.0

    def forward(self, id_embeds: torch.Tensor, clip_features: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(id_embeds.to(self.proj[0].weight.dtype))
        x = self.norm(x.reshape(-1, self.num_tokens, self.width))
        if not hasattr(self, "perceiver_resampler"):
            return x
        if clip_features is None:
            raise ValueError("FaceID-Plus needs the face crop's CLIP features besides the face-ID embedding")
        out = self.perceiver_resampler(x, clip_features)
        return x + self.s_scale * out if self.shortcut else out


def timestep_features(timestep: torch.Tensor, width: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal features of timesteps [B] -> [B, width], cosines first (the time-plus resampler's input)."""
    half = width // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal timestep features -> Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class TimePerceiverAttention(PerceiverAttention):
    """Perceiver attention whose latents are modulated by the timestep (AdaLN shift/scale); q and k are each scaled
    by d^-1/4 and the softmax runs in float32 (the InstantX SD3.5 resampler)."""

    def forward(self, features: torch.Tensor, latents: torch.Tensor,  # type: ignore[override]
                shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents) * (1 + scale[:, None]) + shift[:, None]
        b = latents.shape[0]
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((features, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        s = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * s) @ (k * s).transpose(-2, -1)
        out = torch.softmax(weight.float(), dim=-1).type(weight.dtype) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class TimeResampler(nn.Module):
    """The "time-plus" kind (InstantX SD3.5-Large): a resampler conditioned on the denoising timestep.

    Per layer ``layers.<i>``: ``0`` attention (AdaLN on the latents), ``1`` feed-forward whose LayerNorm is
    AdaLN-modulated too, ``2`` (SiLU, Linear) giving the four shift/scale vectors from the time embedding.
    :meth:`forward` returns the tokens and the time embedding (the per-block image norms read it).
    """

    def __init__(self, embed_dim: int, dim: int, out_dim: int, depth: int, heads: int, dim_head: int,
                 ff_mult: int, num_queries: int, time_in: int):
        super().__init__()
        self.time_in = time_in
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.time_embedding = TimeEmbedding(time_in, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([TimePerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult),
                           nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))])
            for _ in range(depth)
        )

    def forward(self, features: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, S, E] and timesteps [B] -> (tokens [B, Q, C], time embedding [B, dim])."""
        dtype = self.proj_in.weight.dtype
        features = features.to(dtype)
        temb = self.time_embedding(timestep_features(timestep, self.time_in).to(dtype))
        latents = self.latents.repeat(features.shape[0], 1, 1)
        x = self.proj_in(features) + temb[:, None]
        for attn, ff, ada in self.layers:
            shift_msa, scale_msa, shift_mlp, scale_mlp = ada(temb).chunk(4, dim=1)
            latents = attn(x, latents, shift_msa, scale_msa) + latents
            h = ff[0](latents) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            latents = ff[3](ff[2](ff[1](h))) + latents
        return self.norm_out(self.proj_out(latents)), temb


def build_projection(config: AdapterConfig) -> nn.Module:
    """The projection module for ``config.kind``, randomly initialised (load weights after)."""
    c = config
    if c.kind == "global":
        return GlobalProjection(c.embed_dim, c.cross_attention_dim, c.num_tokens)
    if c.kind == "full":
        return TokenMLPProjection(c.embed_dim, c.cross_attention_dim)
    if c.kind == "time-plus":
        return TimeResampler(c.embed_dim, c.resampler_dim, c.cross_attention_dim, c.resampler_depth,
                             c.resampler_heads, c.resampler_dim_head, c.resampler_ff_mult, c.num_tokens,
                             c.time_embed_dim)
    if c.kind == "plus":
        return Resampler(c.embed_dim, c.resampler_dim, c.cross_attention_dim, c.resampler_depth, c.resampler_heads,
                         c.resampler_dim_head, c.resampler_ff_mult, c.num_tokens)
    if c.kind == "mlp":  # InstantX FLUX: pooled embedding -> Linear -> GELU -> Linear -> N tokens -> LayerNorm
        return FaceIDProjection(c.embed_dim, c.id_hidden_dim, c.cross_attention_dim, c.num_tokens, None)
    perceiver = None
    if c.kind == "faceid-plus":
        perceiver = PerceiverStack(c.embed_dim, c.cross_attention_dim, c.cross_attention_dim, c.resampler_depth,
                                   c.resampler_heads, c.resampler_dim_head, c.resampler_ff_mult)
    projection = FaceIDProjection(c.id_embed_dim, c.id_hidden_dim, c.cross_attention_dim, c.num_tokens, perceiver)
    projection.shortcut, projection.s_scale = bool(c.shortcut), float(c.s_scale)
    return projection
