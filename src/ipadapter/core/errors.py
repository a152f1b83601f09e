"""The one exception type users see: a one-line message saying what is wrong and what would fit."""

from __future__ import annotations

import warnings


class IPAdapterError(ValueError):
    """Bad input: a mismatched or corrupt checkpoint, an unreadable image, a bad flag.

    The CLI prints ``error: <message>`` and exits with status 2; no traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class IPAdapterNote(UserWarning):
    """Something was adjusted for the user (an image resized, ...): the CLI prints it as ``note: ...``."""


def note(message: str) -> None:
    warnings.warn(" ".join(message.split()), IPAdapterNote, stacklevel=3)
