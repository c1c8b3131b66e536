"""Evaluate and certify trained runs: clean, PGD and certified accuracy at several ε.

    python certify.py --workdir runs/x --eps 0.1,0.3 --split test \\
        --output results.json --plot curve.png
    python certify.py --workdir runs/a --workdir runs/b --workdir runs/c   # stacked ensemble
    python certify.py --workdir runs/x --weights raw
    python certify.py --workdir runs/x --all_checkpoints --pgd_steps 0 --plot course.png

The same program as ``linf-certify`` and ``python -m linf_jax.cli.certify``
(linf_jax/cli/certify.py). ε is in pixel units.
"""

from linf_jax.cli.certify import command

if __name__ == "__main__":
    command()
