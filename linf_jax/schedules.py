"""Per-iteration schedules of SPEC.md §4–§5, from the epoch boundaries ``(e0, e1, e2, e3, T)``.

Every schedule is a pure function of the step (a Python int or a traced ``jnp`` scalar), so the
jitted train step reads p, ε, lr, λ and the EMA decay from ``state.step`` and never recompiles:

* learning rate: constant ``lr`` until e1, then cosine decay to 0 from e1 to T;
* p: ``p_start`` until e1, then ``p_start · (p_end/p_start)^r`` with r linear 0 → 1 from e1 to
  e3, then ∞ from e3 to T;
* training ε (normalised units): linear ramp 0 → ``eps_train`` over e2 epochs starting at e0
  (``eps_train`` from e0 on when e2 = 0; 0 before e0);
* λ (v2 loss): geometric ``lam_start → lam_end`` along the same r as p (0 when lam_start = 0);
* EMA decay: ``α = min(1 − 1/(epoch + 1), ema_decay)`` (α = 0 in epoch 0), SPEC §5.

:meth:`Schedule.p_phase` is the host-side counterpart of the p schedule ('start', 'ramp' or
'inf'): the train step is compiled once per phase, so the start uses the integer-power fast path
and the final phase the exact ℓ∞ kernels.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Schedule:
    epochs: tuple[int, int, int, int, int]  # (e0, e1, e2, e3, T)
    steps_per_epoch: int
    lr: float
    eps_train: float  # normalised units (pixels / std)
    p_start: float = 8.0
    p_end: float = 1000.0
    lam_start: float = 0.0
    lam_end: float = 0.0
    ema_decay: float = 0.99

    def _steps(self, i: int) -> int:
        return int(self.epochs[i]) * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self._steps(4)

    def ramp(self, step):
        """r ∈ [0, 1]: 0 until e1, linear to 1 at e3, 1 afterwards (float32)."""
        s = jnp.asarray(step, jnp.float32)
        e1, e3 = self._steps(1), self._steps(3)
        if e3 <= e1:
            return jnp.where(s < e1, 0.0, 1.0).astype(jnp.float32)
        return jnp.clip((s - e1) / (e3 - e1), 0.0, 1.0)

    def p(self, step):
        """The p of ``step``: finite before e3, ∞ from e3 on."""
        r = self.ramp(step)
        finite = self.p_start * jnp.exp(r * math.log(self.p_end / self.p_start))
        return jnp.where(jnp.asarray(step) < self._steps(3), finite, INF).astype(jnp.float32)

    def p_phase(self, step: int) -> str:
        """Host-side phase of ``step``: 'start' (p = p_start), 'ramp' (traced p) or 'inf'."""
        if step >= self._steps(3):
            return "inf"
        if step < self._steps(1):
            return "start"
        return "ramp"

    def lr_at(self, step):
        s = jnp.asarray(step, jnp.float32)
        e1, total = self._steps(1), self.total_steps
        if total <= e1:
            return jnp.full_like(s, self.lr)
        t = jnp.clip((s - e1) / (total - e1), 0.0, 1.0)
        return self.lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

    def eps(self, step):
        s = jnp.asarray(step, jnp.float32)
        e0, e2 = self._steps(0), self._steps(2)
        if e2 == 0:
            frac = jnp.where(s >= e0, 1.0, 0.0)
        else:
            frac = jnp.clip((s - e0) / e2, 0.0, 1.0)
        return (self.eps_train * frac).astype(jnp.float32)

    def lam(self, step):
        if self.lam_start == 0:
            return jnp.zeros((), jnp.float32)
        end = self.lam_end if self.lam_end > 0 else self.lam_start
        r = self.ramp(step)
        return (self.lam_start * jnp.exp(r * math.log(end / self.lam_start))).astype(jnp.float32)

    def ema_decay_at(self, step):
        epoch = jnp.asarray(step, jnp.int32) // self.steps_per_epoch
        warm = 1.0 - 1.0 / (epoch.astype(jnp.float32) + 1.0)
        return jnp.minimum(warm, self.ema_decay).astype(jnp.float32)
