"""ℓ∞-dist models of the papers, built by name from a config.

Every model is a trunk of ℓ∞-dist layers followed by a head:

* ``head='none'`` — the pure ℓ∞-dist Net: logits are the NEGATED outputs of the last ℓ∞-dist
  layer (a class is likely when its prototype is close), so interval bounds swap.
* ``head='mlp'`` — ``BoundedLinear(width, head_hidden) → tanh → BoundedLinear(head_hidden, C)``,
  certified by interval bound propagation (the ℓ∞-dist Net + MLP, "++", of v1, and the EMA
  paper's LeNet). The official code's hidden width is 256 for MNIST, 512 for CIFAR-10 and
  Fashion-MNIST (the presets set ``model.head_hidden``).

Layer order: distance → MeanShift → bias. With ``head='none'`` every ℓ∞-dist layer but the last
is mean-shifted and only the last (the logits) has a bias. With ``head='mlp'`` the trunk is the
official ``MLPFeature`` / ``LeNetFeature``: every ℓ∞-dist layer, the last included, is
mean-shifted and none has a bias (a bias on the last trunk layer, without the shift, saturates
most of the head's tanh units at initialisation).

Only the pure nets (``head='none'``) are 1-Lipschitz in ℓ∞ (:func:`is_1_lipschitz`): the
Lipschitz rule ``margin > 2ε`` certifies them (and ensembles of them, whose averaged logits are
1-Lipschitz too), never a model with an MLP head, whose linear layers can stretch distances.

Calls (all on NHWC inputs in normalised units):

* ``model.apply(v, x, p=p, train=t)`` → logits ``[B, C]``.
* ``model.apply(v, x, p=p, train=t, eps=eps, labels=y)`` → ``(logits, margins)``: the training
  worst-case margins, ``r_j ≥ z_j − z_y`` over the ε-ball, from the Lipschitz box ``f ± ε`` on the
  trunk's output pushed through the head (for the pure net ``r_j = z_j − z_y + 2ε``).
* ``model.apply(v, lo, hi, y, method='certify_margins')`` → exact interval bounds through the
  trunk at p = ∞ in evaluation mode, then the head. Certified iff every ``r_j < 0``
  for ``j ≠ y``.
* ``model.apply(v, lo, hi, method='logit_bounds')`` → ``Box`` of the logits.

Every model also owns a scalar ``logit_scale`` (init 1), the learnable ``s`` of the v2 loss.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from math import inf as INF
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from linf_jax import ops
from linf_jax.layers import (
    BoundedLinear,
    Box,
    LinfDist,
    LinfDistConv,
    MeanShift,
    SortDist,
    is_keep_all,
    max_pool,
)

HEADS = ("none", "mlp")


def _flatten(x):
    if isinstance(x, Box):
        return Box(_flatten(x.lo), _flatten(x.hi))
    return x.reshape(x.shape[0], -1)


class _LinfModel(nn.Module):
    """Shared head logic; subclasses define ``setup_trunk`` and ``trunk``."""

    num_classes: int
    head: str = "none"
    head_hidden: int = 256

    def setup(self):
        if self.head not in HEADS:
            raise ValueError(f"model.head={self.head!r} is not one of {HEADS}")
        self.setup_trunk()
        if self.head == "mlp":
            self.fc1 = BoundedLinear(self.feature_dim, self.head_hidden)
            self.fc2 = BoundedLinear(self.head_hidden, self.num_classes)
        self.logit_scale = self.param("logit_scale", nn.initializers.ones, ())

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def _head_logits(self, f):
        if self.head == "none":
            return Box(-f.hi, -f.lo) if isinstance(f, Box) else -f
        h = self.fc1(f)
        return self.fc2(h.map(jnp.tanh) if isinstance(h, Box) else jnp.tanh(h))

    def _head_margins(self, f: Box, labels):
        if self.head == "none":
            # z = -f: max z_j - min z_y = -f.lo_j + f.hi_y
            m = f.hi[jnp.arange(labels.shape[0]), labels][:, None] - f.lo
        else:
            m = self.fc2.margins(self.fc1(f).map(jnp.tanh), labels)
        return jnp.where(jax.nn.one_hot(labels, self.num_classes, dtype=bool), 0.0, m)

    def __call__(self, x, p=INF, train: bool = False, eps=None, labels=None):
        f = self.trunk(x, p, train)
        logits = self._head_logits(f)
        if eps is None:
            return logits
        return logits, self._head_margins(Box(f - eps, f + eps), labels)

    def certify_margins(self, lo, hi, labels):
        """Upper bounds of ``z_j − z_y`` over the box ``[lo, hi]`` (p = ∞, evaluation mode)."""
        return self._head_margins(self.trunk(Box(lo, hi), INF, False), labels)

    def logit_bounds(self, lo, hi) -> Box:
        """Interval of the logits over the box ``[lo, hi]`` (p = ∞, evaluation mode)."""
        return self._head_logits(self.trunk(Box(lo, hi), INF, False))


class LinfDistNet(_LinfModel):
    """ℓ∞-dist Net (``head='none'``, depth 5 for MNIST, 6 for CIFAR-10) or ℓ∞-dist Net + MLP
    (``head='mlp'``, depth 4 / 5), hidden width 5120 in the papers."""

    depth: int = 5
    width: int = 5120

    @property
    def feature_dim(self) -> int:
        return self.width

    def setup_trunk(self):
        self.dists, self.norms = _dense_trunk([self.width] * self.depth, self.head,
                                              self.num_classes)

    def trunk(self, x, p, train):
        return _run_dense(self.dists, self.norms, _flatten(x), p, train)


class LinfLeNet(_LinfModel):
    """The EMA paper's ℓ∞-dist LeNet: ℓ∞-dist convs with 2×2 max-pooling, then dense ℓ∞-dist
    layers, then the head. Defaults: conv C→6 (5×5) + pool → conv 6→16 (5×5) + pool →
    400→120 → 120→1024 → MLP head (for 32×32 inputs; other sizes follow from the shapes)."""

    channels: Sequence[int] = (6, 16)
    kernel_size: int = 5
    dense: Sequence[int] = (120, 1024)
    head: str = "mlp"

    @property
    def feature_dim(self) -> int:
        return self.dense[-1]

    def setup_trunk(self):
        self.convs = [LinfDistConv(c, self.kernel_size) for c in self.channels]
        self.conv_norms = [MeanShift() for _ in self.channels]
        self.dists, self.norms = _dense_trunk(list(self.dense), self.head, self.num_classes)

    def trunk(self, x, p, train):
        for conv, norm in zip(self.convs, self.conv_norms, strict=True):
            x = max_pool(norm(conv(x, p), train), 2)
        return _run_dense(self.dists, self.norms, _flatten(x), p, train)


class _SortModel(_LinfModel):
    """Shared logic of the SortNets (docs/METHOD.md §10): a trunk of :class:`SortDist` layers,
    the first an ℓ∞-dist layer over the input, every later one a sort neuron with keep
    probability ``q`` over its ``top_k`` largest distances.

    * Evaluation, certification (a :class:`Box`), and training without a ``'dropout'`` RNG (the
      statistics re-estimation, :mod:`linf_jax.recalibrate`): the deterministic sort neurons,
      p = ∞ only.
    * Training with a ``'dropout'`` RNG (``rngs={'dropout': key}``): the batch is cut into
      blocks of ``mask_block`` examples; each block keeps a random subset of exactly
      ``round(q·n)`` input units of every layer but the first (the official code draws the
      subset size from Binomial(n, q) per layer call; JAX needs it static), and the layer
      before computes only those units for that block. Each distance is the step's ℓp (or ℓ∞)
      distance over the kept inputs; each MeanShift averages a unit over the blocks that kept
      it. ``q = 1`` trains the plain ℓ∞-dist net.
    """

    depth: int = 5
    width: int = 5120
    q: float = 0.7
    top_k: int = 10
    identity_init: bool = False
    mask_block: int = 32

    # _LinfModel fields a SortNet does not take from a config (its class fixes them)
    FIXED_FIELDS: ClassVar[tuple[str, ...]] = ("head",)

    def _sort_layers(self, widths, last_bias: bool, shifted: int):
        """SortDist layers of the given widths (the first over the input, ℓ∞ only; the others
        sort neurons with ``q``) and MeanShifts for the first ``shifted``."""
        dists = [SortDist(w, None if i == 0 else widths[i - 1], q=None if i == 0 else self.q,
                          top_k=self.top_k, use_bias=last_bias and i == len(widths) - 1,
                          identity_init=self.identity_init)
                 for i, w in enumerate(widths)]
        return dists, [MeanShift(units=w) for w in widths[:shifted]]

    def _rows(self, x):
        """The trunk's input as ``[B, P, F]``: P rows per example of F features (dense models:
        one row, the flattened input)."""
        return x.reshape(x.shape[0], 1, -1)

    def trunk(self, x, p, train):
        rows = Box(*map(self._rows, x)) if isinstance(x, Box) else self._rows(x)
        if (train and not isinstance(x, Box) and not is_keep_all(self.q)
                and self.has_rng("dropout")):
            return _flatten(self._masked_trunk(rows, p))
        return _flatten(_run_dense(self.dists, self.norms, rows, p, train))

    def _masked_trunk(self, x, p):
        b, per, f = x.shape
        blk = min(self.mask_block, b)
        s = -(-b // blk)
        x = jnp.pad(x, ((0, s * blk - b), (0, 0), (0, 0))).reshape(s, blk * per, f)
        valid = jnp.repeat((jnp.arange(s * blk) < b).reshape(s, blk), per, axis=1)
        key = self.make_rng("dropout")
        index = [None]
        for i in range(1, len(self.dists)):
            n = self.dists[i - 1].features
            keep = max(1, round(self.q * n))
            noise = jax.random.uniform(jax.random.fold_in(key, i), (s, n))
            index.append(jnp.sort(lax.top_k(noise, keep)[1], axis=-1).astype(jnp.int32))
        for i, dist in enumerate(self.dists):
            out_index = index[i + 1] if i + 1 < len(index) else None
            x = dist(x, p, in_index=index[i], out_index=out_index)
            if i < len(self.norms):
                x = self.norms[i](x, True, index=out_index, valid=valid)
        return x.reshape(s * blk, per, x.shape[-1])[:b]


class SortNet(_SortModel):
    """The pure SortNet (official ``SortMLPModel``): an ℓ∞-dist layer ``in → width``,
    ``depth − 2`` sort layers ``width → width``, each followed by a MeanShift, and a sort layer
    ``width → classes`` with a bias; logits are its NEGATED outputs. 1-Lipschitz in ℓ∞."""

    FIXED_FIELDS: ClassVar[tuple[str, ...]] = ("head", "head_hidden")

    @property
    def feature_dim(self) -> int:
        return self.num_classes

    def setup_trunk(self):
        widths = [self.width] * (self.depth - 1) + [self.num_classes]
        self.dists, self.norms = self._sort_layers(widths, True, self.depth - 1)


class SortNetMLP(_SortModel):
    """SortNet + MLP (official ``SortHybridModel``): ``depth`` counts every layer, the two of
    the head too, as the official code does: an ℓ∞-dist layer ``in → width``, ``depth − 3`` sort
    layers ``width → width``, each followed by a MeanShift, then the MLP head of
    :class:`LinfDistNet` (``width → head_hidden → tanh → classes``)."""

    head: str = "mlp"
    depth: int = 7

    @property
    def feature_dim(self) -> int:
        return self.width

    def setup_trunk(self):
        widths = [self.width] * (self.depth - 2)
        self.dists, self.norms = self._sort_layers(widths, False, len(widths))


class SortNetConvMLP(SortNetMLP):
    """The convolutional SortNet + MLP, "2x" (official ``SortHybridModel2``): a first ℓ∞-dist
    convolution with a ``(H − stride) × (W − stride)`` kernel and stride ``stride`` (no padding),
    which sees the image at 2 × 2 positions, then ``depth − 3`` 1 × 1 sort convolutions (one
    channel mask shared by the four positions of an example), each followed by a MeanShift,
    then the 4·width features (NHWC order) into the MLP head."""

    stride: int = 4

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    def _rows(self, x):
        b, h, w, c = x.shape
        if h != w or h <= self.stride:
            raise ValueError(f"model.stride={self.stride} is not allowed for {h}x{w} images: "
                             "square images larger than the stride")
        k = h - self.stride
        return ops.extract_patches(x, k, self.stride).reshape(b, 4, -1)


def _dense_trunk(widths: list[int], head: str, num_classes: int):
    """``(dists, norms)`` of the dense ℓ∞-dist layers. ``head='none'``: the last layer has
    ``num_classes`` units and a bias and no MeanShift. ``head='mlp'``: every layer has a
    MeanShift and none a bias (the official ``*Feature`` trunks)."""
    if head == "none":
        widths = widths[:-1] + [num_classes]
        return ([LinfDist(w) for w in widths[:-1]] + [LinfDist(widths[-1], use_bias=True)],
                [MeanShift() for _ in widths[:-1]])
    return [LinfDist(w) for w in widths], [MeanShift() for _ in widths]


def _run_dense(dists, norms, x, p, train):
    """Each ℓ∞-dist layer, followed by its MeanShift where it has one."""
    for i, dist in enumerate(dists):
        x = dist(x, p)
        if i < len(norms):
            x = norms[i](x, train)
    return x


def uses_dropout(model_config) -> bool:
    """Whether a model config trains with random masks (a SortNet with ``q < 1``), so that the
    train step must give it a ``'dropout'`` key."""
    cfg = dict(model_config)
    name = cfg.get("name")
    if name not in MODELS or "q" not in model_fields(name):
        return False
    return not is_keep_all(cfg.get("q", model_fields(name)["q"]))


def is_1_lipschitz(model) -> bool:
    """Whether the model's logits are 1-Lipschitz in ℓ∞ in evaluation mode (at p = ∞): true for
    the pure nets (ℓ∞-dist layers, constant shifts, max-pooling, negation), false for a model
    with an MLP head. Only then may the Lipschitz rule ``margin > 2ε`` certify it."""
    return getattr(model, "head", None) == "none"


# name -> constructor, called as ``MODELS[name](num_classes=..., **fields)``. A variant is a
# ``functools.partial`` of a class whose keywords are defaults the config may still override.
MODELS = {
    "linf_dist_net": LinfDistNet,
    "linf_dist_net_mlp": functools.partial(LinfDistNet, head="mlp"),
    "linf_lenet": LinfLeNet,
    "sort_net": SortNet,
    "sort_net_mlp": SortNetMLP,
    "sort_net_conv_mlp": SortNetConvMLP,
}


def model_fields(name: str) -> dict:
    """``field -> default`` of the model ``name``: the fields a config may set (the class's
    dataclass fields but ``num_classes``, which the data set gives, and Flax's ``parent`` and
    ``name``), with the variant's defaults where ``MODELS[name]`` is a ``functools.partial``."""
    ctor = MODELS[name]
    cls, preset = (ctor.func, ctor.keywords) if isinstance(ctor, functools.partial) else (ctor, {})
    fixed = ("parent", "name", "num_classes", *getattr(cls, "FIXED_FIELDS", ()))
    return {k: preset.get(k, f.default) for k, f in cls.__dataclass_fields__.items()
            if k not in fixed}


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_sort_fields(name: str, f: dict) -> None:
    """One-line errors for the fields only SortNets have (q, depth, identity_init)."""
    if "q" not in f:
        return
    q = f["q"]
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise ValueError(f"model.q={q!r} is not allowed: a keep probability in (0, 1] (1: the "
                         "ℓ∞-dist net)")
    if not isinstance(f["identity_init"], bool):
        raise ValueError(f"model.identity_init={f['identity_init']!r} is not allowed: True or "
                         "False")
    if name == "sort_net_conv_mlp" and f["identity_init"]:
        raise ValueError("model.identity_init=True is not allowed for sort_net_conv_mlp: its "
                         "first layer is a patch layer with no identity rule (False, as the "
                         "official 2x scripts)")
    least = 2 if name == "sort_net" else 3
    if f["depth"] < least:
        raise ValueError(f"model.depth={f['depth']!r} is not allowed: at least {least} for "
                         f"{name}")


def build_model(model_config, num_classes: int) -> _LinfModel:
    """``MODELS[model_config.name](num_classes, **fields)``, every field checked first.

    ``model_config`` is a mapping or ``ml_collections.ConfigDict`` with ``name`` and any of the
    model's fields (:func:`model_fields`: ``depth``, ``width``, ``head``, ``head_hidden``,
    ``channels``, ...; lists become tuples). A field the model does not have (a typo, or a field
    of another model: a LeNet config has no ``depth``) or a value out of range raises
    ``ValueError`` with one line that starts with ``model.<field>=``.
    """
    cfg = dict(model_config)
    name = cfg.pop("name", None)
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model.name={name!r} is not allowed: one of {sorted(MODELS)}")
    fields = model_fields(name)
    for key, value in cfg.items():
        if key == "num_classes":
            raise ValueError(f"model.num_classes={value!r} is not allowed: the data set gives "
                             "the number of classes")
        if key not in fields:
            raise ValueError(f"model.{key}={value!r} is not allowed: unknown field of {name}; "
                             f"allowed: {', '.join(sorted(fields))}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    for key in ("depth", "width", "head_hidden", "kernel_size", "top_k", "mask_block", "stride"):
        if key in kwargs and not _positive_int(kwargs[key]):
            raise ValueError(f"model.{key}={kwargs[key]!r} is not allowed: a positive integer")
    _check_sort_fields(name, {**fields, **kwargs})
    for key in ("channels", "dense"):
        if key in kwargs and (not isinstance(kwargs[key], tuple) or not kwargs[key]
                              or not all(_positive_int(c) for c in kwargs[key])):
            raise ValueError(f"model.{key}={kwargs[key]!r} is not allowed: a non-empty list of "
                             "positive integers")
    if kwargs.get("head", fields.get("head", "none")) not in HEADS:
        raise ValueError(f"model.head={kwargs['head']!r} is not allowed: one of {HEADS}")
    return MODELS[name](num_classes=num_classes, **kwargs)
