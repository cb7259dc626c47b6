"""What a user reads when something goes wrong: one sentence, in the words of where they are.

The API's checks are the single source of truth; their messages name options the Python way
(``set overwrite=True``). A form shows the same message with the option's label instead
(``tick 'Replace the field if it exists'``), through the form's ``Words``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ntt_core import NTTError

logger = logging.getLogger(__name__)

Words = Mapping[str, str]
"""API option name -> its label in a form, e.g. ``{"overwrite": "Replace a bank of that name"}``."""

_MAX_CHARS = 400


def in_form_words(message: str, words: Words | None) -> str:
    """``message`` with each ``set <option>=True`` / ``<option>=True`` named by its form label."""
    for option, label in (words or {}).items():
        message = message.replace(f"set {option}=True", f"tick '{label}'")
        message = message.replace(f"{option}=True", f"'{label}'")
    return message


def sentence(error: BaseException, words: Words | None = None) -> str:
    """One readable sentence for any failure: what happened and, where known, what to do.

    Input errors (``NTTError``) already say what to do. Memory exhaustion is named as such. Any
    other exception is named by its type and first line, and its traceback goes to the log.
    """
    if isinstance(error, NTTError):
        text = in_form_words(str(error), words)
    elif isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        text = (
            "Out of memory: close other work on this machine, pick the Tiny preset or another "
            "device, then run it again"
        )
    else:
        logger.error("Unexpected failure", exc_info=error)
        first_line = (str(error).strip().splitlines() or [""])[0]
        detail = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
        text = f"Unexpected error ({detail}); the server log has the details"
    text = " ".join(text.split())
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 1] + "…"
