"""Decoupled cross-attention against the formula written out by hand; attach/detach as exact inverses."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from conftest import make_adapter, unet_inputs
from ipadapter.bases import attach, attached, detach, unet_layers
from ipadapter.bases.unet import IPAttnProcessor
from ipadapter.core.attention import AdapterState, IPLayer, Runtime

WIDTH, CROSS, HEADS = 32, 24, 2
HEAD_DIM = WIDTH // HEADS


def _randomise(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def _attention(cross: bool) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=WIDTH, cross_attention_dim=CROSS if cross else None, heads=HEADS, dim_head=HEAD_DIM,
                     out_bias=True).eval()


def _sdpa(q, k, v):
    """softmax(Q K^T / sqrt(d)) V per head, written out (float64)."""
    def split(t):
        return t.reshape(t.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)

    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1)
    return (w @ split(v)).transpose(1, 2).reshape(q.shape[0], -1, WIDTH)


def _lin(x, layer):
    return x @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)


def _lora(x, lora):
    return x @ lora.down.weight.double().T @ lora.up.weight.double().T


def _processor(index: int, adapters: list[tuple[IPLayer, AdapterState]]) -> IPAttnProcessor:
    proc = IPAttnProcessor(index, Runtime())
    for layer, state in adapters:
        proc.add(layer, state)
    return proc


def _adapter_layer(seed: int, lora_rank: int = 0, cross: bool = True) -> tuple[IPLayer, AdapterState]:
    layer = IPLayer(WIDTH, CROSS if cross else None, lora_rank, kv_in=CROSS if cross else WIDTH)
    _randomise(layer, seed)
    return layer, AdapterState({1: layer})


# ---------------------------------------------------------------------------------------------- formula
def test_cross_attention_matches_the_formula_with_two_adapters_and_lora():
    attn = _attention(cross=True)
    plain, plain_state = _adapter_layer(1)
    face, face_state = _adapter_layer(2, lora_rank=4)
    attn.set_processor(_processor(1, [(plain, plain_state), (face, face_state)]))
    x, text = torch.randn(2, 10, WIDTH), torch.randn(2, 7, CROSS)
    images_a = torch.randn(1, 2, 3, CROSS), torch.randn(1, 2, 3, CROSS)  # (uncond, cond): 2 images, 3 tokens
    images_b = torch.randn(1, 1, 4, CROSS), torch.randn(1, 1, 4, CROSS)
    plain_state.set_tokens(images_a[1], images_a[0])
    face_state.set_tokens(images_b[1], images_b[0])
    plain_state.scale, face_state.scale, face_state.lora_scale = 0.7, 0.4, 0.8

    with torch.no_grad():
        got = attn(x, encoder_hidden_states=text)
        xd, td = x.double(), text.double()
        s = face_state.lora_scale
        q = _lin(xd, attn.to_q) + s * _lora(xd, face.to_q_lora)
        k = _lin(td, attn.to_k) + s * _lora(td, face.to_k_lora)
        v = _lin(td, attn.to_v) + s * _lora(td, face.to_v_lora)
        z = _sdpa(q, k, v)
        for layer, state, (uncond, cond) in ((plain, plain_state, images_a), (face, face_state, images_b)):
            tokens = torch.cat([uncond, cond]).flatten(1, 2).double()  # rows: [uncond; cond], images concatenated
            z = z + state.scale * _sdpa(q, _lin(tokens, layer.to_k_ip), _lin(tokens, layer.to_v_ip))
        want = _lin(z, attn.to_out[0]) + s * _lora(z, face.to_out_lora)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_self_attention_lora_matches_the_formula():
    attn = _attention(cross=False)
    layer = IPLayer(WIDTH, None, 4, kv_in=WIDTH)
    _randomise(layer, 3)
    state = AdapterState({0: layer})
    state.set_tokens(torch.randn(1, 4, CROSS))  # LoRA is on while the adapter has a prompt
    attn.set_processor(_processor(0, [(layer, state)]))
    x = torch.randn(2, 10, WIDTH)
    with torch.no_grad():
        got = attn(x)
        xd = x.double()
        q = _lin(xd, attn.to_q) + _lora(xd, layer.to_q_lora)
        k = _lin(xd, attn.to_k) + _lora(xd, layer.to_k_lora)
        v = _lin(xd, attn.to_v) + _lora(xd, layer.to_v_lora)
        z = _sdpa(q, k, v)
        want = _lin(z, attn.to_out[0]) + _lora(z, layer.to_out_lora)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_zero_scale_or_no_prompt_is_the_base_attention_bit_for_bit(lora_rank):
    attn = _attention(cross=True)
    x, text = torch.randn(2, 10, WIDTH), torch.randn(2, 7, CROSS)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        base = attn(x, encoder_hidden_states=text)
        layer, state = _adapter_layer(5, lora_rank=lora_rank)
        attn.set_processor(_processor(1, [(layer, state)]))
        assert torch.equal(attn(x, encoder_hidden_states=text), base)  # no prompt set
        state.set_tokens(torch.randn(1, 4, CROSS), torch.randn(1, 4, CROSS))
        assert not torch.allclose(attn(x, encoder_hidden_states=text), base)
        state.scale = 0.0
        assert torch.equal(attn(x, encoder_hidden_states=text), base)


# ------------------------------------------------------------------------------------------ batch layout
def _identity_state(cond, uncond=None):
    layer = IPLayer(4, 4)
    with torch.no_grad():
        layer.to_k_ip.weight.copy_(torch.eye(4))
        layer.to_v_ip.weight.copy_(torch.eye(4))
    state = AdapterState({1: layer})
    state.set_tokens(cond, uncond)
    return state


def _rows(k):
    return [int(r) for r in k[:, 0, 0, 0]]


def test_keys_values_follow_the_unet_batch_layout():
    prompts = 2
    cond = torch.arange(1, prompts + 1).float().view(prompts, 1, 1).expand(prompts, 3, 4).clone()  # 1, 2
    uncond = -cond  # -1, -2
    state = _identity_state(cond, uncond)
    k, _ = state.keys_values(1, 4, cfg_hint=True)
    assert _rows(k) == [-1, -2, 1, 2]
    k, _ = state.keys_values(1, 8, cfg_hint=True)  # 2 images per prompt: [uncond rows; cond rows], repeated
    assert _rows(k) == [-1, -1, -2, -2, 1, 1, 2, 2]
    k, _ = state.keys_values(1, 2, cfg_hint=False)  # guidance off: conditional rows only
    assert _rows(k) == [1, 2]
    k, _ = state.keys_values(1, 4, cfg_hint=False)
    assert _rows(k) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"not \[unconditional; conditional\].*pipeline_kwargs\(\)"):
        state.keys_values(1, 6, cfg_hint=True)
    only_cond = _identity_state(cond)
    k, _ = only_cond.keys_values(1, 4, cfg_hint=True)
    assert _rows(k) == [1, 1, 2, 2]


@torch.no_grad()  # as in generation: gathered K/V are cached only without autograd
def test_keys_values_take_the_rows_the_pipeline_laid_out():
    cond = torch.ones(1, 3, 4)
    state = _identity_state(cond, -cond)  # rows: 0 = uncond (-1), 1 = cond (1)
    state.call_rows = torch.tensor([0, 1, 1])  # PAG: [uncond; cond; perturbed cond]
    k, _ = state.keys_values(1, 3, cfg_hint=True)
    assert _rows(k) == [-1, 1, 1]
    assert state.keys_values(1, 3)[0] is k  # the same rows again: gathered once
    k, _ = state.keys_values(1, 6)  # frames folded into the batch: each row repeated
    assert _rows(k) == [-1, -1, 1, 1, 1, 1]
    state.call_rows = torch.tensor([1, 0, 0])  # InstructPix2Pix-style order
    assert _rows(state.keys_values(1, 3)[0]) == [1, -1, -1]
    with pytest.raises(ValueError, match="laid out 3 image-prompt rows for a denoiser batch of 4"):
        state.keys_values(1, 4)


def test_keys_values_computed_once_per_set_tokens(sd15_pipe):
    unet = sd15_pipe.unet
    adapter = make_adapter(unet, "plus", encoder=sd15_pipe.image_encoder)
    attach(unet, adapter)
    calls = []
    hooks = [layer.to_k_ip.register_forward_hook(lambda *a: calls.append(1))
             for layer in adapter.ip_adapter.values() if layer.has_kv]
    try:
        adapter.state.set_tokens(torch.randn(1, 16, 32), torch.randn(1, 16, 32))
        inputs = unet_inputs(sd15_pipe)
        with torch.no_grad():
            first = unet(**inputs).sample
            for _ in range(2):
                unet(**inputs)
            adapter.state.scale = 0.3  # a scale change needs no new keys/values
            changed = unet(**inputs).sample
        assert len(calls) == 16
        assert not torch.equal(first, changed)
    finally:
        for h in hooks:
            h.remove()
        detach(unet)


# -------------------------------------------------------------------------------------------- attach
def _snapshot(unet):
    return dict(unet.attn_processors), {k: v.clone() for k, v in unet.state_dict().items()}


def _assert_pristine(unet, processors, state):
    now = unet.attn_processors
    assert set(now) == set(processors)
    assert all(now[name] is proc for name, proc in processors.items())  # the very objects, put back
    sd = unet.state_dict()
    assert set(sd) == set(state)
    assert all(torch.equal(sd[k], v) for k, v in state.items())
    assert getattr(unet, "_ipadapter", None) is None
    assert not unet._forward_pre_hooks
    assert attached(unet) == []


@pytest.fixture
def three_adapters(sd15_pipe):
    unet, enc = sd15_pipe.unet, sd15_pipe.image_encoder
    adapters = [make_adapter(unet, kind, encoder=enc, seed=i) for i, kind in enumerate(["global", "plus", "faceid"])]
    tokens = [(torch.randn(1, a.config.num_tokens, 32), torch.randn(1, a.config.num_tokens, 32)) for a in adapters]
    return adapters, tokens


def _forward_with(unet, adapters, tokens, inputs):
    for adapter in adapters:
        attach(unet, adapter)
    for adapter, (cond, uncond) in zip(adapters, tokens):
        adapter.state.set_tokens(cond, uncond)
    with torch.no_grad():
        return unet(**inputs).sample


def test_detach_restores_the_base_model_bit_for_bit(sd15_pipe, three_adapters):
    unet = sd15_pipe.unet
    adapters, tokens = three_adapters
    inputs = unet_inputs(sd15_pipe)
    processors, state = _snapshot(unet)
    with torch.no_grad():
        base = unet(**inputs).sample
    with_all = _forward_with(unet, adapters, tokens, inputs)
    assert not torch.allclose(with_all, base)
    detach(unet)
    _assert_pristine(unet, processors, state)
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, base)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_several_adapters_detach_in_any_order(sd15_pipe, three_adapters, order):
    unet = sd15_pipe.unet
    adapters, tokens = three_adapters
    inputs = unet_inputs(sd15_pipe)
    processors, state = _snapshot(unet)
    _forward_with(unet, adapters, tokens, inputs)
    remaining = list(range(3))
    for i in order[:-1]:
        detach(unet, adapters[i])
        remaining.remove(i)
        assert attached(unet) == [adapters[j] for j in remaining]
        with torch.no_grad():
            got = unet(**inputs).sample
        detach(unet)  # the reference: only the remaining adapters, freshly attached in the same order
        want = _forward_with(unet, [adapters[j] for j in remaining], [tokens[j] for j in remaining], inputs)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    detach(unet, adapters[order[-1]])
    _assert_pristine(unet, processors, state)


def test_attach_twice_is_a_no_op_and_detach_when_none_is_harmless(sd15_pipe):
    unet = sd15_pipe.unet
    adapter = make_adapter(unet, "global", encoder=sd15_pipe.image_encoder)
    processors, state = _snapshot(unet)
    detach(unet)
    attach(unet, adapter)
    attach(unet, adapter)
    assert attached(unet) == [adapter]
    proc = unet.attn_processors[unet_layers(unet)[1].name]
    assert isinstance(proc, IPAttnProcessor) and len(proc.layers) == 1
    detach(unet, adapter)
    _assert_pristine(unet, processors, state)


def test_per_adapter_scale_changes_between_calls(sd15_pipe, three_adapters):
    """Changing one adapter's scale moves its contribution only; scales add up linearly per adapter."""
    unet = sd15_pipe.unet
    adapters, tokens = three_adapters
    adapters, tokens = adapters[:2], tokens[:2]
    inputs = unet_inputs(sd15_pipe)
    both = _forward_with(unet, adapters, tokens, inputs)
    adapters[1].state.scale = 0.0
    with torch.no_grad():
        first_only = unet(**inputs).sample
    detach(unet)
    want = _forward_with(unet, adapters[:1], tokens[:1], inputs)
    assert torch.equal(first_only, want)
    assert not torch.allclose(first_only, both)
    detach(unet)
