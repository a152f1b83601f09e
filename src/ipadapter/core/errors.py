"""The one exception type users see: a one-line message saying what is wrong and what would fit.

Messages name the Python parameter a caller got wrong through :func:`param`: a library caller reads
``strength needs init_image``; the command line shows its flags instead (``--strength needs --init-image``),
mapping the marked names through one table (``cli/args.py``: ``FLAGS``) with :func:`shown_as`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

_MARK = "\x02"  # not whitespace (IPAdapterError joins whitespace), never in a path or a user's text
_PARAM = re.compile(f"{_MARK}([^{_MARK}]+){_MARK}")


def param(name: str) -> str:
    """The parameter ``name`` inside a message: read as itself, shown as its flag by the CLI."""
    return f"{_MARK}{name}{_MARK}"


def shown_as(message: object, names: Mapping[str, str] | None = None) -> str:
    """The message with each marked parameter as ``names[parameter]`` (the parameter itself when not there)."""
    raw = message.args[0] if isinstance(message, BaseException) and message.args else str(message)
    return _PARAM.sub(lambda m: (names or {}).get(m[1], m[1]), str(raw))


class IPAdapterError(ValueError):
    """Bad input: a mismatched or corrupt checkpoint, an unreadable image, a bad flag.

    The CLI prints ``error: <message>`` (parameters shown as flags) and exits with status 2; no traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

    def __str__(self) -> str:
        return shown_as(self)


class IPAdapterNote(UserWarning):
    """Something was adjusted for the user (an image resized, ...): the CLI prints it as ``note: ...``."""

    def __str__(self) -> str:
        return shown_as(self)


def note(message: str) -> None:
    warnings.warn(IPAdapterNote(" ".join(message.split())), stacklevel=3)
