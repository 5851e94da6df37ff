"""Options the editing benchmarks share: where the records are, and how many CPU threads."""

from __future__ import annotations

import argparse

import torch

COUNTERFACT = "../shared/data/counterfact/train.json"


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def use_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` before any work: figures are only comparable at a known count."""
    if args.threads:
        torch.set_num_threads(args.threads)
