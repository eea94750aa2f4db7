"""The `rungate` command line."""

from __future__ import annotations

import argparse
import sys

from rungate import __version__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="rungate", description="Governance control plane for AI agent runs.")
    parser.add_argument("--version", action="version", version=f"rungate {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
