"""The per-block weights of a "time-plus" adapter (InstantX SD3.5), and the image keys/values they make.

Names match the official "ip_adapter.<i>.*" keys: ``norm_ip`` (a LayerNorm without affine weights, shifted and
scaled by a Linear of the resampler's time embedding), ``to_k_ip``/``to_v_ip`` (no bias) and three RMSNorms over
the head width: ``norm_q`` (the block's image-stream queries), ``norm_k`` (its image-stream keys) and ``norm_ip_k``
(the image-prompt keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) (in float32) times a weight, over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class AdaNorm(nn.Module):
    """LayerNorm (no affine weights) shifted and scaled by ``linear(silu(temb))``, shift first."""

    def __init__(self, temb_dim: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.linear = nn.Linear(temb_dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)
        return F.layer_norm(x, (self.dim,), eps=self.eps) * (1 + scale[:, None, :]) + shift[:, None, :]


class JointIPLayer(nn.Module):
    """One joint block's image-prompt weights."""

    def __init__(self, width: int, token_dim: int, temb_dim: int, head_dim: int):
        super().__init__()
        self.norm_ip = AdaNorm(temb_dim, token_dim)
        self.to_k_ip = nn.Linear(token_dim, width, bias=False)
        self.to_v_ip = nn.Linear(token_dim, width, bias=False)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        self.norm_ip_k = RMSNorm(head_dim)
        self.head_dim = head_dim

    # the UNet-era flags AdapterState reads
    has_kv = True
    has_lora = False

    def keys_values(self, tokens: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens [B, T, C] and time embedding [B, E] -> normed keys and values [B, heads, T, head_dim]."""
        x = self.norm_ip(tokens, temb)
        b = x.shape[0]
        k = self.to_k_ip(x).view(b, -1, self.to_k_ip.out_features // self.head_dim, self.head_dim).transpose(1, 2)
        v = self.to_v_ip(x).view(b, -1, self.to_v_ip.out_features // self.head_dim, self.head_dim).transpose(1, 2)
        return self.norm_ip_k(k), v


def joint_layers(config) -> dict[str, JointIPLayer]:
    """The per-block modules of a "time-plus" :class:`~ipadapter.core.config.AdapterConfig`."""
    return {str(i): JointIPLayer(width, config.cross_attention_dim, config.resampler_dim, config.head_dim)
            for i, width in sorted(config.layer_widths.items())}
