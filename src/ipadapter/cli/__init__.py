"""The ``ipadapter`` command: argument parsing over the library, one module per subcommand.

Bad input -> ``error: <one line>`` on stderr, exit 2, no traceback. ``generate`` (``cli/generate.py``) also
holds ``embed``, ``inspect`` and ``convert``; ``train``, ``eval``, ``ui`` and ``world`` have a module each.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..core.errors import IPAdapterError
from .args import _quiet_libraries, flag_message, flag_names


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import eval, generate, train, ui, world

    parser = _Parser(prog="ipadapter", description="IP-Adapter: image prompts for Stable Diffusion (SD 1.x, SDXL).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    generate.add_parsers(sub)  # generate, embed, inspect, convert
    eval.add_eval_parser(sub)
    ui.add_ui_parser(sub)
    train.add_train_parser(sub)
    world.add_world_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    finished = False
    try:
        from . import eval, generate, train, ui, world

        handler = {"generate": generate.cmd_generate, "inspect": generate.cmd_inspect,
                   "convert": generate.cmd_convert, "embed": generate.cmd_embed, "eval": eval.cmd_eval,
                   "ui": ui.cmd_ui, "train": train.cmd_train, "world": world.cmd_world}[args.command]
        # inspect/convert never load diffusers/transformers: do not pay for importing their logging
        with _quiet_libraries() if args.command not in ("inspect", "convert") else contextlib.nullcontext():
            code = handler(args) or 0
        finished = True
        return code
    except IPAdapterError as e:
        print(f"error: {flag_names(flag_message(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group(wait=finished)  # the others may be elsewhere after an error: no barrier then


def _close_process_group(wait: bool) -> None:
    """End a multi-process run (``accelerate launch``/``torchrun`` train or eval) cleanly: wait for the other
    processes, then destroy the group. Left to interpreter exit, gloo's threads can be torn down while still
    joinable and a process dies with SIGABRT ("terminate called without an active exception")."""
    if "torch" not in sys.modules:  # nothing imported torch: no group can exist
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()
