"""``ipadapter ui``: flags -> :func:`~ipadapter.ui.app.launch`."""

from __future__ import annotations

import argparse

from ..core.errors import IPAdapterError
from .args import _positive_int
from .generate import _add_model_flags, _device_and_dtype


def add_ui_parser(sub) -> argparse.ArgumentParser:
    """The ``ui`` subcommand's arguments (``sub``: the CLI's subparsers object)."""
    u = sub.add_parser("ui", help="start the web page (Gradio) for image prompting, with its HTTP API")
    u.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    u.add_argument("--port", type=_positive_int, default=7860)
    u.add_argument("--model", help="diffusers model folder, hub id or single .safetensors/.ckpt file "
                                   "(default: the embedded world model; world-sd3: its SD3.5-shaped member)")
    u.add_argument("--adapter", help="adapter file (default: the embedded model's default adapter)")
    u.add_argument("--image-encoder", help="CLIP vision folder (default: the model's, then one beside the adapter)")
    _add_model_flags(u)
    u.add_argument("--output", default=None, help="folder that keeps every generated PNG (default: a temp folder)")
    u.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (off by default: anyone with the link can use it)")
    return u


def cmd_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise IPAdapterError("the web page needs Gradio: pip install 'ipadapter[ui]'") from None
    from ..generation.loading import parse_lora
    from ..ui import app

    device, dtype = _device_and_dtype(args)  # a bad --device fails here, before any model or server
    model, adapter = app.resolve_model(args.model, args.adapter)  # a missing model fails here, before any server
    options = dict(model_config=args.model_config, loras=[parse_lora(t) for t in args.lora], dtype=dtype)
    app.launch(args.host, args.port, model, adapter, share=args.share, image_encoder=args.image_encoder,
               device=str(device), output_dir=args.output, preload=True, model_options=options)
    return 0
