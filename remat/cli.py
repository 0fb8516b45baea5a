"""The ``remat`` command line: ``remat policies | inspect | sweep | train``.

Each subcommand lives in its own ``_add_<name>`` function below; ``--help``
on any of them lists its options. Human tables (rich) by default, ``--json``
for machines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from remat import policies


def _policies(args: argparse.Namespace) -> int:
    rows = []
    for name in policies.names():
        p = policies.get(name)
        rows.append({
            "name": name,
            "spec": str(p),
            "saves": sorted(p.save) + ([f"dots:{p.dots}"] if p.dots else []),
            "offloads": sorted(p.offload) + ([f"dots:{p.offload_dots}"] if p.offload_dots else []),
            "doc": policies.describe(name),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="remat policies", show_lines=True)
    for col in ("name", "saves", "offloads", "doc"):
        table.add_column(col, overflow="fold")
    for r in rows:
        saves = "everything" if r["spec"] == "none" else ", ".join(r["saves"]) or "-"
        table.add_row(r["name"], saves, ", ".join(r["offloads"]) or "-", r["doc"])
    Console().print(table)
    return 0


def _add_policies(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="list the registered remat policies",
                       description="List every registered policy: what it saves, offloads, and its doc.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_policies)


def build_parser() -> argparse.ArgumentParser:
    """The ``remat`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="remat", description="Named, checked, measured rematerialization policies for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_policies(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``remat`` command. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
