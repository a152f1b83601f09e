"""Denoiser families behind one interface (:class:`~ipadapter.bases.base.BaseFamily`), and attach/detach.

Adding a family is one module in this folder and one line in :data:`FAMILIES`. Everything else asks
:func:`family_of` about the denoiser in hand.

Attach and detach are exact inverses: attach swaps in the family's attention processor on the layers the adapter
touches and remembers the denoiser's own processors; detaching the last adapter puts those very objects back and
removes the forward pre-hook, so the denoiser is the base model again bit for bit.
"""

from __future__ import annotations

from torch import nn

from ..core.adapter import Adapter
from ..core.attention import Runtime
from ..core.config import AdapterConfig
from ..core.errors import IPAdapterError
from .base import BaseFamily, CallFacts, Layer, TrainingParts, execution_device
from .flux import FLUX
from .sd3 import SD3
from .unet import UNET

#: every family, most specific first
FAMILIES: tuple[BaseFamily, ...] = (UNET, FLUX, SD3)


def family_of(pipe_or_denoiser) -> BaseFamily:
    """The family of a diffusers pipeline or of its denoiser; a one-line error for a model no family serves."""
    for family in FAMILIES:
        denoiser = getattr(pipe_or_denoiser, family.denoiser_attr, None)
        if isinstance(denoiser, nn.Module) and family.recognises(denoiser):
            return family
    for family in FAMILIES:
        if family.recognises(pipe_or_denoiser):
            return family
    name = type(pipe_or_denoiser).__name__
    served = "; ".join(f.title for f in FAMILIES)
    raise IPAdapterError(f"{name}: not a model IP-Adapter serves here (supported: {served})")


def family_for_index(model_index: dict) -> BaseFamily | None:
    """The family of a diffusers model folder, from its ``model_index.json`` (None: no family serves it)."""
    return next((f for f in FAMILIES if f.recognises_index(model_index)), None)


def denoiser_of(pipe) -> nn.Module:
    return getattr(pipe, family_of(pipe).denoiser_attr)


def layers_of(denoiser: nn.Module) -> list[Layer]:
    """Every attention layer of the denoiser that may get image attention, with its official checkpoint index."""
    return family_of(denoiser).layers(denoiser)


def describe(denoiser: nn.Module) -> str:
    return family_of(denoiser).describe(denoiser)


def check(config: AdapterConfig, denoiser: nn.Module, source: str = "adapter") -> None:
    """A one-line error when an adapter of ``config`` does not fit the denoiser (before touching it)."""
    family_of(denoiser).check(config, denoiser, source)


def new_adapter(denoiser: nn.Module, kind: str, embed_dim: int, num_tokens: int | None = None,
                **overrides) -> Adapter:
    """A new adapter shaped for ``denoiser`` (training): image K/V start as copies of the layers' text K/V."""
    family = family_of(denoiser)
    adapter = Adapter(family.new_config(denoiser, kind, embed_dim, num_tokens, **overrides))
    family.init_kv(adapter, denoiser)
    return adapter


# ------------------------------------------------------------------------------------------ attach / detach
class _Attachment:
    """Bookkeeping kept on the denoiser while adapters are attached."""

    def __init__(self, denoiser: nn.Module, family: BaseFamily):
        self.family = family
        self.original = family.processors(denoiser)  # the very processor objects, to put back
        self.runtime = Runtime()
        self.adapters: list[Adapter] = []
        self.processors: dict[str, nn.Module] = {}
        runtime = self.runtime

        def pre_forward(module, args, kwargs):
            runtime.observe(family.read_call(args, kwargs))

        self.hook = denoiser.register_forward_pre_hook(pre_forward, with_kwargs=True)


def _attachment(denoiser: nn.Module) -> _Attachment | None:
    return getattr(denoiser, "_ipadapter", None)


def attached(denoiser: nn.Module) -> list[Adapter]:
    attachment = _attachment(denoiser)
    return list(attachment.adapters) if attachment else []


def runtime_of(denoiser: nn.Module) -> Runtime | None:
    attachment = _attachment(denoiser)
    return attachment.runtime if attachment else None


def attach(denoiser: nn.Module, adapter: Adapter, source: str = "adapter") -> Adapter:
    """Give ``denoiser`` the adapter's decoupled attention (several adapters may be attached)."""
    family = family_of(denoiser)
    attachment = _attachment(denoiser)
    if attachment is not None and adapter in attachment.adapters:  # already there (the trainer's validation)
        return adapter
    family.check(adapter.config, denoiser, source)
    if attachment is None:
        attachment = _Attachment(denoiser, family)
        object.__setattr__(denoiser, "_ipadapter", attachment)  # plain attribute, not a submodule
    param = next(denoiser.parameters())
    adapter.to(device=execution_device(denoiser), dtype=param.dtype)  # (offloaded weights may be on meta)
    processors = family.processors(denoiser)
    for layer in family.layers(denoiser):
        key = str(layer.index)
        if key not in adapter.ip_adapter:
            continue
        proc = attachment.processors.get(layer.name)
        if proc is None:
            proc = family.processor(layer, attachment.runtime)
            attachment.processors[layer.name] = proc
        proc.add(adapter.ip_adapter[key], adapter.state)
        processors[layer.name] = proc
    family.install(denoiser, processors)
    _watch(denoiser, attachment)
    attachment.adapters.append(adapter)
    attachment.runtime.states.append(adapter.state)
    return adapter


def _watch(denoiser: nn.Module, attachment: _Attachment) -> None:
    """One of our processors, for the hook to notice a pipeline swapping them out (Runtime.check_processors)."""
    name, proc = next(iter(attachment.processors.items()), (None, None))
    attachment.runtime.watched = (denoiser.get_submodule(name[: -len(".processor")]), proc) if name else None


def detach(denoiser: nn.Module, adapter: Adapter | None = None) -> None:
    """Remove one adapter (or all); with none left the denoiser's own processors come back, exactly."""
    attachment = _attachment(denoiser)
    if attachment is None:
        return
    remove = attachment.adapters if adapter is None else [adapter]
    for a in list(remove):
        for proc in attachment.processors.values():
            proc.remove(a.state)
        attachment.adapters.remove(a)
        attachment.runtime.states.remove(a.state)
        a.state.set_tokens(None)
        a.state.call_rows = None
    family = attachment.family
    if attachment.adapters:
        processors = family.processors(denoiser)
        for name, proc in list(attachment.processors.items()):
            if not proc.states:
                processors[name] = attachment.original[name]
                del attachment.processors[name]
        family.install(denoiser, processors)
        _watch(denoiser, attachment)
        return
    family.install(denoiser, dict(attachment.original))
    attachment.hook.remove()
    object.__delattr__(denoiser, "_ipadapter")


#: the UNet-era name of :func:`layers_of`, kept for callers (``ipadapter.unet_layers``)
unet_layers = layers_of

__all__ = [
    "FAMILIES", "BaseFamily", "CallFacts", "Layer", "TrainingParts", "attach", "attached", "check", "denoiser_of",
    "describe", "detach", "execution_device", "family_for_index", "family_of", "layers_of", "new_adapter",
    "runtime_of", "unet_layers",
]
