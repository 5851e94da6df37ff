"""Options the editing benchmarks share: where the records are, CPU threads, config overrides."""

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


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one setting of the method's config, e.g. top_k=4 or target.lr=1.5 (repeat)",
    )


def read_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--set`` items → ``args.overrides`` as {key: raw value}; the config parses the values."""
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
    args.overrides = dict(item.split("=", 1) for item in args.overrides)
