"""Pretrains or evaluates SimCLR: python main.py --config=RECIPE --workdir=DIR.

The same command as the installed console script simclr-jax: see
simclr_jax/cli.py, or python main.py --help.
"""
from simclr_jax import cli

if __name__ == "__main__":
    cli.run()
