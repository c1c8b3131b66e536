"""Shared command-line plumbing: user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import sys

from linf_jax.classifier import InputError
from linf_jax.data import DataError
from linf_jax.ensemble import EnsembleError
from linf_jax.train_lib import CheckpointError, ConfigError, TrainingError

USER_ERRORS = (ConfigError, DataError, EnsembleError, CheckpointError, InputError,
               TrainingError, PermissionError, FileNotFoundError, IsADirectoryError,
               NotADirectoryError)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_guarded(fn, *args, **kwargs):
    """Calls ``fn``; a user error exits with its one-line message and no traceback."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        if isinstance(err, OSError) and err.filename is not None:
            fail(f"{err.strerror}: {err.filename}")
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
