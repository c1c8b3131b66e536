"""A value in force for the code run (and traced) inside a ``with`` block, per thread: how the
kernel choice (:func:`linf_jax.ops.use_kernels`), the XLA code's forced shape
(:func:`linf_jax.ops.xla.traced_in_shape`) and the Pallas kernels' platform
(:func:`linf_jax.ops.pallas.built_for`) reach the code traced under them."""

from __future__ import annotations

import contextlib
import threading
from typing import Any


class Scoped:
    """One such value: :meth:`get` reads it (None outside every block), :meth:`set` is the
    ``with`` block that sets it and restores the previous value on leaving."""

    def __init__(self):
        self._local = threading.local()

    def get(self) -> Any:
        return getattr(self._local, "value", None)

    @contextlib.contextmanager
    def set(self, value: Any):
        previous = self.get()
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = previous
