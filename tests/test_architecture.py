"""The package's structure: an import graph without circles, command lines outside the library,
flags defined only when a command runs."""

import ast
import pathlib
import subprocess
import sys

from conftest import REPO

PACKAGE = pathlib.Path(REPO) / "linf_jax"


def _modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: the linf_jax modules it imports}``, from the source: every import statement,
    at the top or inside a function (a deferred import still ties two modules together). An
    import of ``linf_jax.ops.xla`` from outside ``linf_jax.ops`` also runs
    ``linf_jax/ops/__init__.py`` first, so it counts as importing that package too."""
    modules = _modules(package)

    def owner(name: str) -> str | None:  # linf_jax.ops.xla.scan_blocks -> linf_jax.ops.xla
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = owner(name) if name.startswith("linf_jax") else None
                while target and target != "linf_jax":
                    inside = module == target or module.startswith(target + ".")
                    if not inside:
                        graph[module].add(target)
                    target = target.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []



def test_importing_a_module_of_a_package_from_outside_imports_the_package(tmp_path):
    """``calibration`` importing ``linf_jax.ops.xla`` runs ``linf_jax/ops/__init__.py``, which
    imports ``dispatch``, which imports ``calibration``: a circle through the package."""
    root = tmp_path / "linf_jax"
    (root / "ops").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "ops" / "__init__.py").write_text("from linf_jax.ops import dispatch\n")
    (root / "ops" / "dispatch.py").write_text("from linf_jax import calibration\n")
    (root / "ops" / "xla.py").write_text("import jax\n")
    (root / "calibration.py").write_text("def f():\n    from linf_jax.ops import xla\n")
    graph = import_graph(root)
    assert graph["linf_jax.calibration"] == {"linf_jax.ops", "linf_jax.ops.xla"}
    assert cycles(graph) == [["linf_jax.calibration", "linf_jax.ops", "linf_jax.ops.dispatch"]]


def test_no_linf_jax_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "linf_jax.ops.dispatch" in graph["linf_jax.ops"]  # the graph is read
    assert cycles(graph) == []


def test_the_library_never_imports_the_command_lines():
    """Entry points live in linf_jax.cli; no library module imports it (the command lines
    import the library, never the reverse)."""
    graph = import_graph()
    library = [m for m in graph if not m.startswith("linf_jax.cli")]
    assert len(library) > 20
    offenders = {m: sorted(t for t in graph[m] if t.startswith("linf_jax.cli"))
                 for m in library}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_library_modules_do_not_print():
    """The library logs; only the command lines print."""
    offenders = []
    for module, path in _modules().items():
        if module.startswith("linf_jax.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "print"):
                offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


def _assert_prints_ok(code: str) -> None:
    """Runs ``code`` in a fresh Python process (nothing imported yet) and expects ``ok``."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_importing_every_command_line_defines_no_flag():
    """Importing the command-line modules together defines no absl flag (each command defines
    its flags when it runs), so two of them never collide on a name such as --workdir."""
    code = ("from absl import flags\n"
            "import linf_jax.cli.train, linf_jax.cli.certify, linf_jax.cli.plot, "
            "linf_jax.cli.schedule\n"
            "ours = {m: [f.name for f in fs] for m, fs in "
            "flags.FLAGS.flags_by_module_dict().items() if 'linf_jax' in m}\n"
            "assert not ours and 'workdir' not in flags.FLAGS, ours\n"
            "print('ok')\n")
    _assert_prints_ok(code)


def test_helpshort_lists_the_commands_flags():
    """Flags defined when a command runs are still the program's key flags: ``--helpshort``
    of ``python train.py`` and ``python -m linf_jax.cli.certify`` lists them."""
    for cmd, flag in (([sys.executable, "train.py"], "--workdir"),
                      ([sys.executable, "-m", "linf_jax.cli.certify"], "--[no]all_checkpoints")):
        proc = subprocess.run([*cmd, "--helpshort"], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert f"  {flag}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_the_library_imports_without_the_packages_a_bare_accelerator_image_lacks():
    """The training and certification path imports ml-collections, tensorboardX and
    tensorflow-datasets only where they are used (the config file, the TensorBoard writer, the
    TFDS reader and its split slicing): a GPU/TPU image with jax, flax, optax and orbax alone
    imports it and loads a whole split of the embedded digits; a sliced split says in one line
    that it needs tensorflow-datasets."""
    code = ("import importlib.abc, sys\n"
            "ABSENT = ('ml_collections', 'tensorboardX', 'tensorflow_datasets', 'tensorflow')\n"
            "class Absent(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ABSENT:\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "import linf_jax.trainer, linf_jax.classifier, linf_jax.export, linf_jax.ops\n"
            "from linf_jax import data\n"
            "assert len(data.load('digits', 'train').labels) > 1000  # a whole split: no TFDS\n"
            "try:\n"
            "    data.load('digits', 'train[:10]')\n"
            "except data.DataError as e:\n"
            "    assert 'needs tensorflow-datasets' in str(e), e\n"
            "print('ok')\n")
    _assert_prints_ok(code)
