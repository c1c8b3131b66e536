"""Shared fixtures: a tiny, fast training configuration on the embedded digits."""

import os
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# One persistent XLA compilation cache for the test session, shared by the pytest-xdist workers
# and by the train.py / certify.py subprocesses the tests start (they inherit the environment;
# JAX reads these variables when it is imported, which is after this file). The suite compiles
# the same programs many times over (every tiny run, every command-line case); a cache hit
# loads the executable XLA compiled for the identical program, flags and devices, so no result
# changes, only the time. The size limit turns on JAX's file lock, which makes the workers'
# reads and writes of an entry atomic; it also has every write list and stat the whole cache
# folder (JAX's LRU eviction), so the cost of the writes grows with the square of the entries.
# Only programs that took at least 0.2 s to compile are written: in a tiny train.py run they
# are a minority of the programs but most of the compilation time, and caching every program
# made the folder so large that listing it on each write became a noticeable part of the
# suite's CPU time (BENCHMARKS.md, "Test suite time").
# LINF_JAX_TEST_XLA_CACHE=0 turns the cache off.
if os.environ.get("LINF_JAX_TEST_XLA_CACHE", "1") != "0":
    _user = os.getuid() if hasattr(os, "getuid") else "user"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"linf_jax_test_xla_cache-{_user}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

# The native kernels' build and their calibration go to a cache of the test session's own, never
# to the user's (~/.cache/linf_jax): the calibration below is timed under the test-only XLA flag.
os.environ.setdefault(
    "LINF_JAX_CACHE", os.path.join(tempfile.gettempdir(),
                                   f"linf_jax_test_native-{getattr(os, 'getuid', lambda: 0)()}"))

# Which kernels "auto" runs is fixed in the test session: the native kernels for every pass,
# wherever they build (LINF_JAX_CALIBRATION=native; linf_jax/ops/calibration.py), on every CPU kind,
# instead of a timing taken while the suite loads both cores. The suite is dominated by
# compiling many small programs that then run for milliseconds, and a program with the native
# custom calls compiles much faster than one with the XLA code's unrolled scans, so where the
# instruction-set rule picks the XLA code (an AVX2-only CPU) the whole suite takes far longer
# (BENCHMARKS.md, "Test suite time"). The XLA code is still tested wherever it runs for users:
# against float64 and the native kernels (test_ops, test_kernels, test_native), in sharded and
# multi-host programs (which always take it), in exports, and end to end on an AVX2 CPU with the
# instruction-set rule (test_train). The calibration itself is tested on its own
# (tests/test_native.py clears this variable there).
os.environ.setdefault("LINF_JAX_CALIBRATION", "native")

# XLA spends most of the suite's time compiling small programs that then run for milliseconds.
# Two flags make that compilation cheaper; neither changes what a program computes beyond
# rounding (every comparison in the suite is between programs compiled under the same flags).
# What each saves, measured back to back: BENCHMARKS.md, "Test suite time".
#
# --xla_backend_optimization_level=0: LLVM generates the machine code at -O0 instead of -O2 (the
# same functions, XLA's HLO passes still run, no fast-math; unvectorised; whether a multiply and
# an add are fused differs).
#
# --xla_cpu_use_fusion_emitters=false: XLA's CPU backend emits each fusion's loops directly as
# LLVM IR (its older elemental emitters) instead of through its MLIR fusion pipeline, whose fixed
# cost per fusion dominates a small program's compilation. At LLVM's default -O2 the older
# emitters compile more slowly than the new ones, so the two flags go together. The flag is
# added only where this jaxlib knows it (XLA aborts on an unknown flag): its name must appear
# in jaxlib's library.
#
# LINF_JAX_TEST_FAST_COMPILE=0 leaves XLA_FLAGS alone.
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
FUSION_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _jaxlib_knows(flag: str) -> bool:
    """Whether jaxlib's XLA library contains the flag's name (searched through mmap, without
    reading the libraries into memory)."""
    import glob
    import importlib.util
    import mmap

    spec = importlib.util.find_spec("jaxlib")
    name = flag.lstrip("-").split("=")[0].encode()
    for lib in glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so")) if spec else ():
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(name) >= 0:
                return True
    return False


TEST_XLA_FLAGS = (TEST_XLA_FLAG,)
if os.environ.get("LINF_JAX_TEST_FAST_COMPILE", "1") != "0":
    _flags = os.environ.get("XLA_FLAGS", "")
    if FUSION_EMITTERS_FLAG in _flags or _jaxlib_knows(FUSION_EMITTERS_FLAG):
        TEST_XLA_FLAGS += (FUSION_EMITTERS_FLAG,)
    _missing = [f for f in TEST_XLA_FLAGS if f not in _flags]
    if _missing:
        os.environ["XLA_FLAGS"] = " ".join([_flags, *_missing]).strip()

# The test processes get the allocator settings train.py and certify.py start with
# (linf_jax/host.py: XLA's buffers kept off mmap), which make the in-process tests somewhat
# cheaper (BENCHMARKS.md, "Test suite time").
from linf_jax import host  # noqa: E402 - after the environment above

host.tune_allocator()


def xla_flags(*extra):
    """XLA_FLAGS for a subprocess: the session's flags without a forced host device count (a
    subprocess picks its own), plus ``extra``."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, *extra])


def tiny_config(**overrides):
    """Depth-3, width-32 ℓ∞-dist net on the digits: every p phase in ~130 steps."""
    from linf_jax.config import base_config

    c = base_config()
    c.data.train_split = "train[:640]"
    c.model.update(depth=3, width=32)
    c.train.update(batch_size=64, epochs=(0, 2, 2, 4, 6), log_every=5,
                   checkpoint_every_epochs=2, eps_train=0.15)
    c.eval.update(eps=(0.02, 0.1), pgd_steps=10, pgd_restarts=1, batch_size=120)
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


@pytest.fixture
def tiny():
    return tiny_config


def init_with_running_means(cfg, shape, seed=0, num_classes=10):
    """``(model, variables)``: a random init plus one training-mode pass on N(0, 1) inputs, so
    the MeanShift running means are non-zero (evaluation mode then uses them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from linf_jax.models import build_model

    model = build_model(cfg, num_classes)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    # jitted: one compilation each instead of one per operation of an eager pass
    v = jax.jit(lambda key, x: model.init(key, x, p=8.0, train=True))(jax.random.key(seed), x)
    _, upd = jax.jit(lambda v, x: model.apply(v, x, p=8.0, train=True,
                                              mutable=["batch_stats"]))(v, x)
    return model, {**v, **upd}


def np_patches(x, k, stride, padding, dilation):
    """NHWC → ``[B, H', W', C·k·k]`` with feature order (C, kh, kw), by an explicit loop (the
    float64 reference of the convolutional ops)."""
    import numpy as np

    x = np.pad(np.float64(x), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    b, h, wd, c = x.shape
    span = dilation * (k - 1) + 1
    ho, wo = (h - span) // stride + 1, (wd - span) // stride + 1
    out = np.zeros((b, ho, wo, c * k * k))
    for i in range(ho):
        for j in range(wo):
            r, c = i * stride, j * stride
            patch = x[:, r:r + span:dilation, c:c + span:dilation]
            out[:, i, j] = patch.transpose(0, 3, 1, 2).reshape(b, -1)  # (C, kh, kw)
    return out


class StepSetup:
    """What a test needs to call one train step of ``cfg`` directly: the data set, its meta,
    the schedule, optimiser, model, a fresh state and the jitted step."""

    def __init__(self, cfg, split=None, steps_per_epoch=10, adam_eps=1e-10):
        import jax

        from linf_jax import data as data_lib
        from linf_jax import experiment, optim, train_lib, trainer
        from linf_jax.models import build_model

        self.ds = data_lib.load("digits", split or cfg.data.train_split)
        self.meta = trainer.dataset_meta(self.ds)
        self.schedule = experiment.make_schedule(cfg, steps_per_epoch, self.meta["std"])
        self.tx = optim.make_optimizer(self.schedule, cfg.train.weight_decay, adam_eps)
        self.model = build_model(cfg.model, self.meta["num_classes"])
        self.state = train_lib.create_train_state(cfg, self.model,
                                                  tuple(self.meta["input_shape"]), self.tx)
        # The module-level train_step, bound to the config as the training loop binds it and
        # jitted here (tests call the real step, not a stand-in).
        bound = train_lib.bind_train_step(cfg, self.schedule, self.meta)
        assert bound.func is train_lib.train_step
        self.step = jax.jit(bound, static_argnames=("p_phase",))


def read_tensorboard_scalars(workdir) -> dict:
    """``{tag: {step: value}}`` of every TensorBoard event file in ``workdir``, read from the
    TFRecord framing (length, CRC, Event proto, CRC) with tensorboardX's own protos; a later
    file's values win, as TensorBoard shows a resumed run."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    out: dict = {}
    for path in sorted(glob.glob(os.path.join(os.fspath(workdir), "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        i = 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
    return out


def hand_pgd_agrees_with_project_pgd(clf, x, y, eps: float, steps: int = 20, seed: int = 3):
    """A user's own PGD on pixels, written with ``jax.grad`` through the classifier (the same
    rule as :func:`linf_jax.certify.pgd_attack`: one random start, sign steps of ε/4, projection
    on the ε-ball and [0, 1]), against the project's PGD in network units with the same key.
    Returns ``(hand_fooled, project_fooled)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from linf_jax import certify as certify_lib

    key = jax.random.PRNGKey(seed)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)

    def loss(z):
        return optax.softmax_cross_entropy_with_integer_labels(clf(z), y).sum()

    grad = jax.jit(jax.grad(loss))
    lo, hi = jnp.maximum(x - eps, 0.0), jnp.minimum(x + eps, 1.0)
    rkey = jax.random.split(key, 1)[0]
    noise = jnp.clip(eps / 4 * jax.random.normal(rkey, x.shape, x.dtype), -eps / 2, eps / 2)
    z = jnp.clip(x + noise, lo, hi)
    for _ in range(steps):
        z = jnp.clip(z + eps / 4 * jnp.sign(grad(z)), lo, hi)
    hand = np.asarray((clf(z).argmax(-1) != y) | (clf(x).argmax(-1) != y))
    eps_n = eps / clf.std
    _, project = certify_lib.pgd_attack(clf.logits_fn, key, clf.normalize(x), y, eps_n,
                                        *clf.pixel_box, steps=steps, restarts=1)
    return hand, np.asarray(project)


def _copy_source(dest):
    """The repository's files without the virtual environment, runs and caches (a wheel is
    built from this copy, so the checkout gains no build/ folder)."""
    import shutil

    ignore = shutil.ignore_patterns(".venv", "runs", "build", "dist", "*.egg-info", ".git",
                                    "__pycache__", ".pytest_cache", ".ruff_cache", "out")
    shutil.copytree(REPO, dest, ignore=ignore)


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """``(bin folder, work folder, wheel)``: a wheel of this checkout installed in a fresh venv
    outside the repository. The dependencies come from this interpreter's site-packages through
    a .pth file (installing them again would only download what is already here)."""
    import subprocess
    import sysconfig

    from filelock import FileLock

    root = tmp_path_factory.mktemp("pkg")
    venv = root / "venv"
    # One wheel for the whole session: the xdist workers share the folder above their own
    # (pytest-N/popen-gwK); a run without xdist uses its own pytest-N, never a folder that an
    # earlier session (an older checkout) left a wheel in.
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "linf_jax_wheel"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "lock")):
        wheels = shared / "wheels"
        if not any(wheels.glob("linf_jax-*.whl")):
            _copy_source(shared / "src")
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(wheels), str(shared / "src")], check=True, capture_output=True,
                           timeout=600)
    wheel = next(wheels.glob("linf_jax-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    site = subprocess.run([str(bin_dir / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    work = root / "work"
    work.mkdir()
    return bin_dir, work, wheel


# The files that take longest (measured cold, BENCHMARKS.md "Test suite time") start first: with
# --dist loadfile each xdist worker takes the next file in this order when it is free, so the
# long ones overlap at the start instead of one of them running alone at the end. Only the
# order changes; every file runs as before.
LONGEST_FIRST = ("test_distributed.py", "test_notebook.py", "test_soundness.py",
                 "test_cli_errors.py", "test_native.py", "test_ensemble.py", "test_recipes.py",
                 "test_preemption.py", "test_packaging.py", "test_train.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
