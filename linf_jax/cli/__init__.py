"""Shared command-line plumbing: user mistakes become ONE line on stderr and exit code 2.

Every mistake a user can make on the command line (a bad flag, a bad config value, a data set or
a checkpoint that cannot be used, a folder that cannot be written) ends the program with one line
``error: <field>=<value> ...: <what is allowed>`` on stderr, exit code 2 and no traceback, before
any file is changed. Programming errors keep their traceback.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys

from linf_jax.config import preset_names, preset_path  # noqa: F401 - for the commands
from linf_jax.errors import first_line


def fail(message: str, code: int = 2) -> None:
    """Prints ``error: message`` as one line on stderr and exits with ``code``."""
    line = " ".join(str(message).split("\n")).strip()
    print(f"error: {line}", file=sys.stderr, flush=True)
    if sys.stderr is not sys.__stderr__:  # captured (pytest, notebooks): change nothing else
        raise SystemExit(code)
    # A command line ends here: nothing may follow the one line. Log records are switched
    # off, and the one known kind of shutdown noise is dropped: after a failed restore of a
    # damaged checkpoint, Orbax's pending asyncio reads are collected once its event loop is
    # closed and reported as "Exception ignored in <coroutine ...>". Anything else still
    # reaches stderr through the default hook.
    logging.disable(logging.CRITICAL)
    sys.unraisablehook = _without_shutdown_noise(sys.__unraisablehook__)
    raise SystemExit(code)


def _is_shutdown_noise(unraisable) -> bool:
    """Orbax's asyncio reads of a damaged checkpoint, collected after its event loop closed:
    an orphaned coroutine, or TensorStore's callback reaching the closed loop."""
    err = unraisable.exc_value
    closed_loop = isinstance(err, RuntimeError) and "Event loop is closed" in str(err)
    orphan_read = inspect.iscoroutine(unraisable.object) or "coroutine" in repr(unraisable.object)
    return closed_loop or orphan_read


def _without_shutdown_noise(hook):
    """An unraisable hook that drops :func:`_is_shutdown_noise` and passes the rest to ``hook``."""
    return lambda unraisable: None if _is_shutdown_noise(unraisable) else hook(unraisable)


def resolve_presets(argv, flag: str = "config") -> list[str]:
    """``argv`` with ``--config NAME`` / ``--config=NAME`` of a preset replaced by its file
    (a path that exists is left alone)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith(f"--{flag}="):
            head, value = arg.split("=", 1)
        elif arg == f"--{flag}" and i + 1 < len(out):
            head, value = None, out[i + 1]
        else:
            continue
        name = value[:-3] if value.endswith(".py") else value
        if not os.path.exists(value) and os.sep not in value and name in preset_names():
            if head is None:
                out[i + 1] = preset_path(name)
            else:
                out[i] = f"{head}={preset_path(name)}"
    return out


def parse_flags(argv):
    """``app.run(main, flags_parser=parse_flags)``: absl's flag parsing, but a bad flag, a bad
    ``--config.*`` override or a config file that cannot be loaded is one line and exit code 2
    (absl's own parser prints two lines and exits 1; ml_collections raises with a traceback)."""
    from absl import flags

    argv = resolve_presets(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(f"{first_line(err)} (see --helpshort)")
    except Exception as err:  # noqa: BLE001 - ml_collections: AttributeError, KeyError, IOError
        fail(config_override_message(err, argv))


def config_override_message(err: BaseException, argv) -> str:
    """One line for an exception that ml_collections raised while applying ``--config.*``
    (an override naming no field: ``AttributeError("'widht'\\nDid you mean 'width'...")``)."""
    import re

    text = str(err)
    hint = re.search(r"Did you mean \W*(\w+)", text)
    hint = f" (did you mean {hint.group(1)!r}?)" if hint else ""
    for arg in argv[1:]:
        name = arg.split("=", 1)[0].lstrip("-")
        if not name.startswith("config."):
            continue
        for part in name.split(".")[1:]:
            if re.search(rf"'{re.escape(part)}\\?'", text):
                return (f"--{name}: the config has no field {part!r}{hint}; allowed: the fields "
                        "of the config file (see configs/ and linf_jax/config.py)")
    return f"bad --config override ({first_line(err)}{hint})"


def define_config_flag(help_text: str):
    """``--config`` (a preset name or a config file, default the ``default`` preset) with every
    ``--config.FIELD`` override; an override naming no field is one line and exit 2."""
    from ml_collections import config_flags

    try:  # without --config, ml_collections applies the --config.* overrides right here
        return config_flags.DEFINE_config_file("config", preset_path("default"), help_text,
                                               lock_config=True)
    except Exception as err:  # noqa: BLE001 - an override naming no config field
        fail(config_override_message(err, sys.argv))


def load_config(holder, flag_name: str = "config"):
    """The ConfigDict of a ``DEFINE_config_file`` flag, or one line when the file cannot be
    loaded (missing, not Python, no ``get_config()``)."""
    from absl import flags

    filename = getattr(flags.FLAGS[flag_name], "config_filename", None)
    if filename is not None and not os.path.isfile(filename):
        fail(f"--{flag_name}={filename!r}: no such file or preset; allowed: a Python config "
             f"file with get_config() or a preset name ({', '.join(preset_names())})")
    try:
        config = holder.value
        config.keys()  # a config that failed to load raises on first use
    except Exception as err:  # noqa: BLE001 - any failure to load the user's file
        fail(f"--{flag_name}={filename!r} cannot be loaded: {first_line(err)}")
    return config


def quiet_logging() -> None:
    """Orbax and JAX log at INFO (every save, the TPU probe): keep stderr for errors."""
    import logging as std_logging

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    # Orbax reads a checkpoint with asyncio tasks; when one read of a damaged checkpoint fails,
    # the others end with "Task exception was never retrieved" and a traceback. The failure
    # itself reaches the user as one line (CheckpointError).
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    # ... the coroutines of those reads, collected at exit, print "Exception ignored in
    # <coroutine ...>" with the same traceback through sys.unraisablehook, and TensorStore's
    # callbacks of the reads still in flight, reaching the asyncio loop that Orbax has closed,
    # print "RuntimeError: Event loop is closed" the same way. Only these two are silenced.
    sys.unraisablehook = _without_shutdown_noise(sys.unraisablehook)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable_dir(path: str, field: str) -> None:
    """Fails (one line) unless ``path`` is, or can be created as, a writable folder."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            fail(f"{field}={path!r} is not allowed: it is a file; allowed: a writable folder")
        if not os.access(path, os.W_OK | os.X_OK):
            fail(f"{field}={path!r} is not allowed: the folder is not writable; allowed: a "
                 "writable folder")
        return
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        fail(f"{field}={path!r} is not allowed: {base!r} is a file, not a folder; allowed: a "
             "writable folder")
    if not os.access(base, os.W_OK | os.X_OK):
        fail(f"{field}={path!r} is not allowed: {base!r} is not writable; allowed: a writable "
             "folder")


def check_writable_file(path: str, field: str) -> None:
    """Fails (one line) unless a file can be written at ``path`` (its folder must exist)."""
    if os.path.isdir(path):
        fail(f"{field}={path!r} is not allowed: it is a folder; allowed: a writable file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is a file" if os.path.exists(parent) else "does not exist"
        fail(f"{field}={path!r} is not allowed: the folder {parent!r} {what}; allowed: a file "
             "in an existing, writable folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        fail(f"{field}={path!r} is not allowed: not writable; allowed: a file in an existing, "
             "writable folder")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are a user's mistake (one line, no traceback): every type of
    :mod:`linf_jax.errors`, and the OS's refusals of a path."""
    from linf_jax import errors

    return (errors.ConfigError, errors.CheckpointError, errors.TrainingError, errors.DataError,
            errors.EnsembleError, errors.InputError, errors.ExportError, errors.PlotInputError,
            PermissionError,
            FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)


def run_guarded(fn, *args, **kwargs):
    """Calls ``fn``; a user error exits with its one-line message and no traceback."""
    try:
        return fn(*args, **kwargs)
    except user_errors() as err:
        if isinstance(err, OSError) and err.filename is not None:
            fail(f"{err.strerror}: {err.filename}")
        fail(first_line(err))


def percent(fraction) -> str:
    """``' 97.50%'``, or ``'n/a: not 1-Lipschitz'`` where the figure is null (the Lipschitz rule
    of a model that is not 1-Lipschitz, e.g. with an MLP head)."""
    return "n/a: not 1-Lipschitz" if fraction is None else f"{100 * fraction:6.2f}%"


def resolve_kernels(config=None):
    """The command's :class:`linf_jax.ops.KernelChoice` (``config.kernels`` of a run, else
    ``LINF_JAX_KERNELS``, else ``auto``), resolved once and announced in one line; a bad
    ``config.kernels``, ``LINF_JAX_KERNELS`` or ``LINF_JAX_NATIVE_ISA`` is one line and exit 2."""
    from linf_jax import experiment, ops

    if config is not None:
        kernels = run_guarded(experiment.kernels, config)
    else:
        try:
            kernels = ops.resolve()
        except ValueError as err:
            fail(first_line(err))
    print(kernels.line(), flush=True)
    return kernels


class _LibraryLines(logging.Formatter):
    """The library's log records as the command lines show them: ``linf_jax: ...`` (progress
    such as the native build or the calibration, on stdout) and ``warning: ...`` (on stderr)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "linf_jax: " if record.levelno < logging.WARNING else "warning: "
        return prefix + record.getMessage()


def show_library_messages() -> None:
    """The library logs (it never prints); a command line shows its ``linf_jax`` records of
    level INFO and above: INFO on stdout, warnings and errors on stderr, one line each."""
    logger = logging.getLogger("linf_jax")
    if any(isinstance(h.formatter, _LibraryLines) for h in logger.handlers):
        return
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    warn = logging.StreamHandler(sys.stderr)
    warn.setLevel(logging.WARNING)
    for handler in (info, warn):
        handler.setFormatter(_LibraryLines())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main_entry(main, flags_module: str | None = None) -> None:
    """``if __name__ == "__main__": main_entry(main)``: absl's ``app.run`` with the one-line flag
    errors of :func:`parse_flags`; Ctrl-C outside training exits 130 without a traceback."""
    from absl import app

    from linf_jax import host

    host.tune_allocator()  # XLA's CPU buffers off mmap (linf_jax/host.py)
    show_library_messages()
    module = sys.modules.get(flags_module) if flags_module else None
    if module is not None and module is not sys.modules["__main__"]:
        # a console script or train.py/certify.py: --helpshort lists the command's flags (absl
        # shows the key flags of the program, sys.argv[0])
        from absl import flags

        for flag in flags.FLAGS.get_flags_for_module(module.__name__):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:
        sys.exit(130)
