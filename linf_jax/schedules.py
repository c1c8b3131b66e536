"""Per-iteration schedules of the two official recipe families (docs/METHOD.md §5, the recipes
that use them: docs/RECIPES.md), and :func:`preview`, their values at chosen steps.

Both families read the same five-number ``train.epochs`` tuple, differently. With ``B`` the steps
per epoch and ``ef = step / B`` the position of a step in epochs (a schedule runs before the
forward pass of its step, as in the official ``main.py``\\ s), ``clip(x) = min(max(x, 0), 1)``:

``schedule = 'v1'`` (ICML 2021 code, ``zbh2047/L_inf-dist-net``, and the EMA paper's fork),
``(e0, e1, e2, e3, T)``:

* lr: ``lr0`` until e1, then ``½·lr0·(1 + cos(π·(ef − e1)/(T − e1)))``, 0 at T
  (constant when T ≤ e1);
* p: ``r = clip((ef − e1)/(e3 − e1))``; ``p_start·(p_end/p_start)^r`` before e3, ∞ from e3 on;
* ε: **e2 is a duration**: ``eps_train · clip((ef − e0)/e2)``, and ``eps_train`` from step 0
  when e2 = 0;
* λ (only the v2 and ce_hinge losses have one): ``lam_start·(lam_end/lam_start)^r`` with the r
  of p.

``schedule = 'v2'`` (ICLR 2022 code, ``zbh2047/L_inf-dist-net-v2``), ``(es, ee, ps, pe, T)``,
with ``ratio(s, e) = 1 if e ≤ s else clip((ef − s)/(e − s))``:

* lr: a cosine over the whole run from step 0, ``½·lr0·(1 + cos(π·ef/T))`` (the logit scale
  has its own base lr on the same cosine, :func:`linf_jax.optim.make_optimizer`);
* p: ``r = ratio(ps, pe)``; ∞ where ``r = 1`` **and** ``p_end ≥ 100``, else
  ``p_start·(p_end/p_start)^r``;
* ε: ``eps_train · ratio(es, ee)``: constant from step 0 when ee ≤ es (every official script);
* λ: ``lam_start·(lam_end/lam_start)^r`` with the r of p.

Both: the EMA decay is ``min(1 − 1/(epoch + 1), ema_decay)`` with ``epoch = floor(ef)``.

Both, with ``eps_smooth = r0 > 0`` (SortNet's ``--eps-smooth``, ``zbh2047/SortNet``, ``main.py``;
0 = off, the linear ramp above): the ε ratio ``t`` of the family (v1 ``clip((ef − e0)/e2)``, v2
``ratio(es, ee)``) becomes :func:`smooth_eps_ratio` of it, ``t⁴ / ((4 − 3·r0)·r0³)`` below r0
(a quartic start, flat at 0) and the line ``1 − 4·(1 − t)/(4 − 3·r0)`` from r0 on, which meets
the quartic at r0 in value and slope and reaches 1 at t = 1. A constant ε (t = 1 throughout) is
unchanged.

Units: ``Schedule.eps_train`` and :meth:`Schedule.eps` are in **normalised** units (pixels / the
data set's scalar std), what the network sees; ``config.train.eps_train`` and the preview's
``eps_train`` are in **pixels**.

Every schedule is a pure function of the step (a Python int or a traced ``jnp`` scalar), so the
jitted train step reads p, ε, lr, λ and the EMA decay from ``state.step`` and never recompiles.
:meth:`Schedule.p_phase` is the host-side counterpart of the p schedule ('start': p = p_start,
'ramp': a traced p, 'inf'): the train step is compiled once per phase, so the start uses the
integer-power fast path and the ℓ∞ phase the exact ℓ∞ kernels. The cosine is evaluated as
``lr0·sin²(π/2·(T − ef)/(T − e1))`` (the same function), which keeps float32 accuracy down to the
last step, where ``1 + cos`` would cancel.

The command-line preview of a config's schedule is ``linf-schedule``
(:mod:`linf_jax.cli.schedule`)::

    linf-schedule --config cifar10_8_v2 --epochs 0,100,675,1300 --json sched.json --plot sched.png
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from linf_jax.config import FAMILIES, epochs_named

INF = float("inf")
V2_INF_MIN_P_END = 100.0  # v2 switches to p = ∞ at pe only when p_end >= 100 (main.py)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """p, ε, lr, λ and the EMA decay of every step; ``family`` picks how ``epochs`` is read:
    'v1' ``(e0, e1, e2, e3, T)`` or 'v2' ``(es, ee, ps, pe, T)`` (module docstring)."""

    epochs: tuple[int, int, int, int, int]
    steps_per_epoch: int
    lr: float
    eps_train: float  # normalised units (pixels / std)
    p_start: float = 8.0
    p_end: float = 1000.0
    lam_start: float = 0.0
    lam_end: float = 0.0
    ema_decay: float = 0.99
    family: str = "v1"
    eps_smooth: float = 0.0  # r0 of the smooth ε ramp; 0: linear (module docstring)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"train.schedule={self.family!r} is not allowed: one of {FAMILIES}")
        if not 0.0 <= self.eps_smooth < 1.0:
            raise ValueError(f"train.eps_smooth={self.eps_smooth!r} is not allowed: a number "
                             "in [0, 1)")

    def step_of(self, name: str) -> int:
        """The step at which epoch ``name`` of the tuple (``'e1'``, ``'ps'``, ``'T'``, ...:
        :data:`linf_jax.config.EPOCH_NAMES`) begins."""
        return epochs_named(self.family, self.epochs)[name] * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.step_of("T")

    # --- ratios in [0, 1] (float32), as functions of the step -----------------------------------

    def _ratio(self, step, start: int, end: int):
        """``clip((step − start)/(end − start))`` in float32; ``end ≤ start`` is handled by the
        callers (the families differ there)."""
        s = jnp.asarray(step, jnp.float32)
        return jnp.clip((s - start) / (end - start), 0.0, 1.0)

    def _inf_from(self) -> int | None:
        """The first step at which p = ∞ (``None``: never)."""
        if self.family == "v1":
            return self.step_of("e3")
        ps, pe = self.step_of("ps"), self.step_of("pe")
        if self.p_end < V2_INF_MIN_P_END:
            return None
        return 0 if pe <= ps else pe

    def ramp(self, step):
        """The p ratio r ∈ [0, 1] that p and λ follow (float32). v1: 0 until e1, linear to 1 at
        e3 (a step from 0 to 1 at e1 when e3 ≤ e1); v2: ``ratio(ps, pe)``."""
        if self.family == "v1":
            e1, e3 = self.step_of("e1"), self.step_of("e3")
            if e3 <= e1:
                s = jnp.asarray(step)
                return jnp.where(s < e1, 0.0, 1.0).astype(jnp.float32)
            return self._ratio(step, e1, e3)
        ps, pe = self.step_of("ps"), self.step_of("pe")
        if pe <= ps:
            return jnp.ones_like(jnp.asarray(step, jnp.float32))
        return self._ratio(step, ps, pe)

    def linear_eps_ratio(self, step):
        """The linear ε ratio t (float32). v1: ``clip((ef − e0)/e2)``, 1 when e2 = 0; v2:
        ``ratio(es, ee)``, 1 when ee ≤ es."""
        if self.family == "v1":
            e0, e2 = self.step_of("e0"), self.step_of("e2")
            if e2 == 0:
                return jnp.ones_like(jnp.asarray(step, jnp.float32))
            return self._ratio(step, e0, e0 + e2)
        es, ee = self.step_of("es"), self.step_of("ee")
        if ee <= es:
            return jnp.ones_like(jnp.asarray(step, jnp.float32))
        return self._ratio(step, es, ee)

    def eps_ratio(self, step):
        """ε / eps_train (float32): :meth:`linear_eps_ratio`, through
        :func:`smooth_eps_ratio` when ``eps_smooth > 0``."""
        t = self.linear_eps_ratio(step)
        return t if self.eps_smooth == 0 else smooth_eps_ratio(t, self.eps_smooth)

    # --- the schedules ------------------------------------------------------------------------

    def p(self, step):
        """The p of ``step`` (float32; ∞ in the ℓ∞ phase)."""
        r = self.ramp(step)
        finite = self.p_start * jnp.exp(r * math.log(self.p_end / self.p_start))
        start = self._inf_from()
        if start is None:
            return finite.astype(jnp.float32)
        return jnp.where(jnp.asarray(step) >= start, INF, finite).astype(jnp.float32)

    def p_phase(self, step: int) -> str:
        """Host-side phase of ``step``: 'start' (p = p_start exactly), 'ramp' (a traced p) or
        'inf'."""
        start = self._inf_from()
        if start is not None and step >= start:
            return "inf"
        first = self.step_of("e1") if self.family == "v1" else self.step_of("ps")
        last = self.step_of("e3" if self.family == "v1" else "pe")
        if self.family == "v2" and last <= first:  # ratio 1 from step 0: p = p_end
            return "ramp"
        return "start" if step < first else "ramp"

    def lr_factor(self, step):
        """lr / lr0 (float32): ``½(1 + cos(π·r))``, computed as ``sin²(π/2·(1 − r))``.
        v1: ``r = (ef − e1)/(T − e1)`` clipped (1 before e1; constant 1 when T ≤ e1); v2:
        ``r = ef/T``."""
        total = self.total_steps
        first = self.step_of("e1") if self.family == "v1" else 0
        s = jnp.asarray(step, jnp.float32)
        if total <= first:
            return jnp.ones_like(s)
        u = jnp.clip((total - s) / (total - first), 0.0, 1.0)
        return jnp.square(jnp.sin((0.5 * jnp.pi) * u)).astype(jnp.float32)

    def lr_at(self, step):
        """The learning rate of ``step`` (the main parameter group)."""
        return (self.lr * self.lr_factor(step)).astype(jnp.float32)

    def eps(self, step):
        """Training ε of ``step`` in normalised units."""
        return (self.eps_train * self.eps_ratio(step)).astype(jnp.float32)

    def lam(self, step):
        """λ of the v2 and ce_hinge losses: geometric ``lam_start → lam_end`` along the p ratio
        (0 when lam_start = 0; constant lam_start when lam_end = 0)."""
        if self.lam_start == 0:
            return jnp.zeros_like(jnp.asarray(step, jnp.float32))
        end = self.lam_end if self.lam_end > 0 else self.lam_start
        r = self.ramp(step)
        return (self.lam_start * jnp.exp(r * math.log(end / self.lam_start))).astype(jnp.float32)

    def ema_decay_at(self, step):
        """The EMA decay α of ``step`` (float32): ``min(1 − 1/(epoch + 1), ema_decay)`` with
        ``epoch = step // steps_per_epoch``, so 0 for the whole first epoch (the average copies
        the weights) and the cap from the first epoch ≥ ``1/(1 − ema_decay) − 1`` on
        (docs/METHOD.md §7)."""
        epoch = jnp.asarray(step, jnp.int32) // self.steps_per_epoch
        warm = 1.0 - 1.0 / (epoch.astype(jnp.float32) + 1.0)
        return jnp.minimum(warm, self.ema_decay).astype(jnp.float32)

    # --- host-side description -----------------------------------------------------------------

    def boundaries(self) -> list[float]:
        """Epochs worth a look: 0, the tuple's boundaries, the middle of the p ramp, the last
        step before p = ∞, and T (sorted, in [0, T])."""
        e = epochs_named(self.family, self.epochs)
        total = e["T"]
        b = self.steps_per_epoch
        if self.family == "v1":
            points = [0, e["e0"], e["e0"] + e["e2"], e["e1"], (e["e1"] + e["e3"]) / 2, e["e3"],
                      total]
        else:
            points = [0, e["es"], e["ee"], e["ps"], (e["ps"] + e["pe"]) / 2, e["pe"], total]
        if self.eps_smooth > 0:  # where the quartic start of the smooth ε ramp meets the line
            start, length = ((e["e0"], e["e2"]) if self.family == "v1"
                             else (e["es"], e["ee"] - e["es"]))
            if length > 0:
                points.append(start + self.eps_smooth * length)
        inf = self._inf_from()
        if inf is not None and inf > 0:
            points.append((inf - 1) / b)
        return sorted({round(float(x) * b) / b for x in points if 0 <= x <= total})


def smooth_eps_ratio(t, r0: float):
    """SortNet's smooth ε ramp (``zbh2047/SortNet``, ``main.py``, ``create_schedule``) of the
    linear ratio ``t`` ∈ [0, 1], with ``0 < r0 < 1``: ``k·t⁴`` for t < r0 and
    ``1 − (1 − k·r0⁴)·(1 − t)/(1 − r0)`` from r0 on, ``k = 1/((4 − 3·r0)·r0³)``; the second
    branch is ``1 − 4·(1 − t)/(4 − 3·r0)``, written so here (the same line, exactly 1 at t = 1).
    Both branches meet at r0 with value ``r0/(4 − 3·r0)`` and slope ``4/(4 − 3·r0)`` (0.142857
    and 1.428571 at r0 = 0.4), and the ramp increases from 0 at t = 0 to 1 at t = 1. Works on
    Python floats, NumPy and JAX arrays (float32 for JAX inputs)."""
    k = 1.0 / ((4.0 - 3.0 * r0) * r0 ** 3)
    if isinstance(t, (int, float)):
        return k * t ** 4 if t < r0 else 1.0 - 4.0 * (1.0 - t) / (4.0 - 3.0 * r0)
    t = jnp.asarray(t, jnp.float32)
    line = 1.0 - 4.0 * (1.0 - t) / (4.0 - 3.0 * r0)
    return jnp.where(t < r0, k * t ** 4, line).astype(jnp.float32)


def p_to_json(p: float):
    """p for JSON: a number, or the string ``"inf"`` in the ℓ∞ phase."""
    return "inf" if math.isinf(p) else float(p)


def preview(schedule: Schedule, steps, std: float | None = None,
            logit_scale_lr: float | None = None) -> dict:
    """The schedule at ``steps`` (host lists): ``epochs``, ``steps``, ``phase``, ``p`` (a number
    or "inf"), ``eps_train`` (pixels), ``eps_train_normalized``, ``lr``, ``logit_scale_lr``,
    ``lam`` and ``ema_decay``; and one number, ``eps_smooth`` (the r0 of the smooth ε ramp that
    the ε values follow, 0 for the linear ramp).

    ``std``: the data set's std, with ``schedule.eps_train`` in normalised units (as
    :func:`linf_jax.experiment.make_schedule` builds it); ``None``: ``schedule.eps_train`` is in
    pixels and ``eps_train_normalized`` is None. ``logit_scale_lr``: the base lr of the logit
    scale (default ``schedule.lr``)."""
    steps = [int(s) for s in steps]
    arr = jnp.asarray(steps, jnp.int32)
    p = np.asarray(schedule.p(arr), np.float64)
    ratio = np.asarray(schedule.eps_ratio(arr), np.float64)
    factor = np.asarray(schedule.lr_factor(arr), np.float64)
    pixels = schedule.eps_train * (1.0 if std is None else std)
    scale_lr = schedule.lr if logit_scale_lr is None else logit_scale_lr
    return {
        "epochs": [s / schedule.steps_per_epoch for s in steps],
        "steps": steps,
        "phase": [schedule.p_phase(s) for s in steps],
        "p": [p_to_json(v) for v in p],
        "eps_train": [pixels * r for r in ratio],
        "eps_train_normalized": (None if std is None else
                                 [float(v) for v in np.asarray(schedule.eps(arr), np.float64)]),
        "lr": [float(v) for v in np.asarray(schedule.lr_at(arr), np.float64)],
        "logit_scale_lr": [float(np.float32(scale_lr * f)) for f in factor],
        "lam": [float(v) for v in np.asarray(schedule.lam(arr), np.float64)],
        "ema_decay": [float(v) for v in np.asarray(schedule.ema_decay_at(arr), np.float64)],
        "eps_smooth": float(schedule.eps_smooth),
    }



if __name__ == "__main__":
    # `python -m linf_jax.schedules --config <preset>`: the preview command (linf-schedule). Run
    # as a script, not imported, so linf_jax.schedules itself never depends on the command line.
    import runpy

    runpy.run_module("linf_jax.cli.schedule", run_name="__main__", alter_sys=True)
