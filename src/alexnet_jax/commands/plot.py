"""Training curves from metrics.jsonl: loss, top-1 and top-5 error against step.

    python -m alexnet_jax.commands.plot --workdir=runs/a [--workdir=runs/b ...] [--out=curves.png]

The command line of alexnet_jax.reporting.curves, where the work is done.
"""

from __future__ import annotations

import argparse
import os

from alexnet_jax import cli, paths
from alexnet_jax.reporting.curves import CURVES_FILE, plot_curves


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.commands.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", action="append", required=True, help="a run's directory; repeat to compare runs")
    parser.add_argument("--out", default="", help=f"PNG to write (default: FIRST_WORKDIR/{CURVES_FILE})")
    args = parser.parse_args(argv)
    workdirs = [paths.readable_directory(workdir, flag="--workdir") for workdir in args.workdir]
    out = args.out or os.path.join(workdirs[0], CURVES_FILE)
    paths.writable_directory(os.path.dirname(os.path.abspath(out)), flag="--out's directory")
    plot_curves(workdirs, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
