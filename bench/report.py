"""A benchmark's command-line ending: its error as one line and status 2, or its table and JSON."""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def comma_ints(parser: argparse.ArgumentParser, flag: str, text: str, what: str = "comma-separated integers") -> list[int]:
    """`text` ("1,8,32") as integers; anything else is the parser's one-line error naming `flag`."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        parser.error(f"{flag} must be {what}, got {text!r}")


def run_and_report(name: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], dict],
                   print_table: Callable[[dict], None]) -> int:
    """`run(args)`, then its table on stdout and its result (with the arguments) as JSON to `args.out`."""
    try:
        result = run(args)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result | {"args": vars(args)}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0
