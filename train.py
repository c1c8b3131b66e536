"""Train an ℓ∞-dist net (or an ensemble) from a config file or a preset name.

    python train.py                                   # configs/default.py on the digits
    python train.py --config configs/mnist_03.py --workdir runs/mnist
    python train.py --config mnist_03 --print_config  # a preset by name; the resolved config
    python train.py --config.model.width=1024 --config.ensemble.size=5

The same program as ``linf-train`` and ``python -m linf_jax.cli.train``. Every
config field can be overridden on the command line (the fields: linf_jax/config.py and the
README's "Configs"). Rerunning with the same workdir resumes from its latest checkpoint;
SIGTERM/SIGINT save a checkpoint and exit.
"""

from linf_jax.cli.train import command

if __name__ == "__main__":
    command()
