"""Train an ℓ∞-dist net (or an ensemble) from a config file or a preset name.

    linf-train                                        # the default preset on the digits
    linf-train --config mnist_03 --workdir runs/mnist  # a preset by name (configs/)
    linf-train --config my_config.py --config.model.width=1024 --config.ensemble.size=5
    linf-train --config mnist_03 --print_config       # the resolved config, then exit

``python -m linf_jax.cli.train`` and ``python train.py`` in a checkout are the same program. Every
config field can be overridden on the command line (the fields: linf_jax/config.py and the
README's "Configs"). Rerunning with the same workdir resumes from its latest checkpoint;
SIGTERM/SIGINT save a checkpoint and exit.
"""

from __future__ import annotations

import functools
import os
import sys
import types

from absl import flags


def define_flags() -> types.SimpleNamespace:
    """The command's flags, defined when it runs (never on import): so that importing several
    command modules defines no flag twice."""
    from linf_jax.cli import define_config_flag

    fl = types.SimpleNamespace()
    fl.config = define_config_flag(
        "Experiment config: a preset name (default, mnist_03, cifar10_8, ...: the files of "
        "configs/) or a Python file with get_config(). Every field can be overridden "
        "(--config.train.lr=0.01); --print_config shows them all.")
    fl.workdir = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config name>).")
    fl.progress = flags.DEFINE_bool("progress", True, "Show a progress bar.")
    fl.print_config = flags.DEFINE_bool(
        "print_config", False, "Print the resolved config (the file with every --config.FIELD "
        "override applied, validated) and exit without training. Every field can be overridden: "
        "--config.train.lr=0.01; the fields are those of linf_jax/config.py (README, 'Configs').")
    fl.distributed = flags.DEFINE_bool(
        "distributed", False,
        "Multi-host: call jax.distributed.initialize() first (docs/SCALING.md).")
    fl.coordinator_address = flags.DEFINE_string(
        "coordinator_address", None, "With --distributed: host:port of process 0 (default: the "
        "cluster's own, or $JAX_COORDINATOR_ADDRESS).")
    fl.num_processes = flags.DEFINE_integer(
        "num_processes", None, "With --distributed: the number of processes ($JAX_NUM_PROCESSES).")
    fl.process_id = flags.DEFINE_integer(
        "process_id", None, "With --distributed: this process's index ($JAX_PROCESS_ID).")
    return fl


def _env_int(name: str) -> int | None:
    from linf_jax.cli import fail

    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        fail(f"${name}={text!r} is not allowed: an integer")


def initialize_distributed(fl: types.SimpleNamespace) -> None:
    """``jax.distributed.initialize`` from the flags, then the environment; on TPU pods, SLURM
    and Open MPI everything left unset is detected by JAX itself."""
    import jax

    from linf_jax.cli import fail
    from linf_jax.config import first_line

    num = fl.num_processes.value if fl.num_processes.value is not None else _env_int(
        "JAX_NUM_PROCESSES")
    pid = fl.process_id.value if fl.process_id.value is not None else _env_int("JAX_PROCESS_ID")
    if num is not None and num < 1:
        fail(f"--num_processes={num} is not allowed: a positive integer")
    if pid is not None and (pid < 0 or (num is not None and pid >= num)):
        top = "num_processes-1" if num is None else num - 1
        fail(f"--process_id={pid} is not allowed: 0..{top}")
    try:
        jax.distributed.initialize(coordinator_address=fl.coordinator_address.value,
                                   num_processes=num, process_id=pid)
    except (ValueError, RuntimeError) as err:
        fail(f"--distributed: jax.distributed.initialize failed ({first_line(err)}); "
             "allowed: a cluster JAX detects (TPU pod, SLURM, Open MPI) or --coordinator_address,"
             " --num_processes and --process_id (see docs/SCALING.md)")


def _remove_empty_tree(path: str) -> None:
    """Removes ``path`` if it holds nothing but empty folders (a run that never started)."""
    for root, _, files in os.walk(path, topdown=False):
        if files:
            return
        try:
            os.rmdir(root)
        except OSError:
            return


def main(argv, fl: types.SimpleNamespace) -> None:
    from linf_jax import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: use --flag=value")
    cli.quiet_logging()  # Orbax logs every save at INFO
    if fl.distributed.value:  # before anything touches the devices
        initialize_distributed(fl)
    elif any(f.present for f in (flags.FLAGS["coordinator_address"], flags.FLAGS["num_processes"],
                                 flags.FLAGS["process_id"])):
        cli.fail("--coordinator_address, --num_processes and --process_id are only allowed "
                 "with --distributed")
    config = cli.load_config(fl.config)
    from linf_jax import config as config_lib  # no JAX yet: a bad field fails fast

    # Every check that needs no training data runs before anything is written; the fields are
    # checked before JAX, Flax and Orbax are imported, the model's when it is built.
    cli.run_guarded(config_lib.validate_config, config)
    from linf_jax import experiment

    cli.run_guarded(experiment.build_model, config, 2)  # the model's fields (2: any class count)
    if fl.print_config.value:
        print(config.to_json_best_effort(indent=2, sort_keys=True))
        return

    config_lib.request_determinism(config)  # before JAX starts its backend
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = fl.workdir.value or os.path.join("runs", name)
    cli.check_writable_dir(workdir, "--workdir")

    from linf_jax import checkpoint as ckpt
    from linf_jax import trainer

    cli.run_guarded(ckpt.check_resume, config, workdir)
    kernels = cli.resolve_kernels(config)  # resolved once, recorded in meta.json
    created = not os.path.exists(workdir)
    try:
        result = cli.run_guarded(trainer.train_and_evaluate, config, workdir,
                                 progress=fl.progress.value, kernels=kernels, validated=True)
    except SystemExit:
        if created:  # e.g. the data could not be loaded: leave no empty run folder behind
            _remove_empty_tree(workdir)
        raise
    if result.preempted:
        print(f"interrupted at step {int(result.state.step)}; checkpoint saved in {workdir}. "
              "Rerun the same command to resume.")
        sys.exit(0)
    r = result.results
    print(f"workdir: {workdir}")
    print(f"EMA weights, {r['num_examples']} test examples of {config.data.source}:"
          f"{config.data.test_split}")
    print(f"  clean accuracy      {100 * r['clean_accuracy']:6.2f}%")
    for row in r["results"]:
        print(f"  eps={row['eps']:<6g} PGD-{r['pgd_steps']} {100 * row['pgd_accuracy']:6.2f}%   "
              f"certified {100 * row['certified_accuracy']:6.2f}%   "
              f"(Lipschitz rule {cli.percent(row['lipschitz_certified_accuracy'])})")


def command() -> None:
    """The ``linf-train`` console command."""
    from linf_jax.cli import main_entry

    main_entry(functools.partial(main, fl=define_flags()), flags_module=__name__)


if __name__ == "__main__":
    command()
