"""The presets: one file per experiment, each citing the official script it mirrors.

Installed as ``linf_jax.configs``; ``linf-train --config NAME`` takes a file name of this folder.
"""
