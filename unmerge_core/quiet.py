"""Third-party output kept out of ``unmerge run`` and ``unmerge attribute`` unless ``--verbose``.

Loading a model prints transformers' "Loading weights" progress bars and its advisories, transformers
and PEFT raise FutureWarnings nothing a user can act on, and starting Ray logs a notice about its
authentication token. :func:`quiet_third_party` silences them for the length of a command, here and in
the processes it starts (through environment variables; one the user set keeps its value), and
puts every setting back afterwards. It lives in the core, not in the plugins: their source is part of
the artifacts' cache keys.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
"""Set (unless already set) for the processes a command starts: Ray workers, converters."""

NOISY_MODULES = r"(transformers|peft|huggingface_hub|accelerate|mergekit)(\..*)?"
"""Modules whose FutureWarnings are ignored."""

QUIET_LOGGERS = ("ray._private.authentication",)
"""Loggers kept to errors: Ray's "Token authentication is enabled for this Ray cluster" notice."""


@contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Within the block: no transformers progress bars, warnings or advisories (errors only), no
    FutureWarning from transformers, PEFT and their kin, no Ray token notice. ``verbose`` leaves all
    of them as they are."""
    if verbose:
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", category=FutureWarning, module=NOISY_MODULES)
        # transformers (and the hub) before the environment below: in this process the settings stay
        # switchable (the hub freezes HF_HUB_DISABLE_PROGRESS_BARS when it is first imported)
        hf_logging = _transformers_logging()
        if hf_logging is not None:
            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            stack.callback(_restore_transformers, hf_logging, verbosity, bars)
        saved = {name: os.environ.get(name) for name in QUIET_ENVIRONMENT}
        stack.callback(_restore_environment, saved)
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        for name in QUIET_LOGGERS:
            logger = logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        yield


def _transformers_logging() -> Any:
    try:
        import transformers.utils.logging as hf_logging
    except ImportError:  # not installed: nothing of it to silence
        return None
    return hf_logging


def _restore_transformers(hf_logging: Any, verbosity: int, bars: bool) -> None:
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


def _restore_environment(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
