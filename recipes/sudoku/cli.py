"""Command-line pieces shared by the recipe's scripts (train, tune, eval)."""

from __future__ import annotations

import argparse


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--threads`: torch intra-op threads for the run (the script passes it to `torch.set_num_threads`)."""
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads: 2 on an idle 2-core machine, 1 on a busy one"
    )
