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

from ..core.attention import AdapterState, Runtime


class StepTokens:
    """``transformer.image_proj`` while a time-plus adapter is attached: features + timestep -> every block's K/V.

    ``embeds``: the rows the pipeline laid out, [rows, S, H] (one image each) or [rows, n, S, H] (n images each,
    whose tokens are concatenated). Returns (tokens, time embedding) as diffusers' resampler does; the transformer
    hands them to every processor, which uses them as the sign that this call carries an image prompt.
    """

    def __init__(self, states: list[AdapterState], runtime: Runtime):
        self.states = states
        self.runtime = runtime

    def __call__(self, embeds: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.states[0]
        rows = embeds.shape[0]
        n = embeds.shape[1] if embeds.ndim == 4 else 1
        flat = embeds.reshape(rows * n, *embeds.shape[-2:])
        times = timestep.repeat_interleave(n) if n > 1 else timestep
        tokens, temb = state.projection(flat, times)
        if n > 1:
            tokens, temb = tokens.reshape(rows, n * tokens.shape[1], tokens.shape[2]), temb[::n]
        # the denoising progress only matters under start/end or a curve (reading it syncs a GPU)
        progress = _progress(timestep, self.runtime.num_train_timesteps) if state.schedule is not None else 0.0
        state.kv.clear()
        state.step_scales = {i: state.effective_scale(i, progress) for i in state.layers}
        state.step_tokens = tokens
        for index, layer in state.layers.items():
            if state.step_scales[index] != 0:  # a zero scale (or outside start..end) costs nothing, as in diffusers
                state.kv[index] = layer.keys_values(tokens, temb)
        return tokens, temb


def _progress(timestep, num_train_timesteps: int) -> float:
    """1 - t / T for the call's timestep; only read when a schedule or start/end asks (it syncs a GPU)."""
    t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
    return min(max(1.0 - t / num_train_timesteps, 0.0), 1.0)


class JointIPProcessor(nn.Module):
    """Attention processor of one joint block (or dual-attention ``attn2``) with a time-plus adapter's weights."""

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
