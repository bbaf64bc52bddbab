"""The `offramp` command. Subcommands that need torch import it only when they run."""

from __future__ import annotations

import argparse
import logging

from training.cli import register as register_training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offramp", description="early-exit text classification")
    sub = parser.add_subparsers(dest="command", required=True)
    register_training(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
