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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model on real text (bytes) under a remat policy",
        description="Byte-level language modelling (default corpus: this Python's standard library) "
                    "with AdamW + warmup/cosine + clipping, orbax checkpoints, exact --resume, "
                    "metrics.jsonl and loss.png in --out. Options left out take the defaults of "
                    "remat.train.TrainConfig, or with --resume the run's saved values.")
    p.add_argument("--model", help="model preset")
    p.add_argument("--policy", help="remat policy name or spec")
    p.add_argument("--groups", help="nested layer groups: 'sqrt' or 'G,K' with G*K = layers")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch", type=int, help="sequences per step")
    p.add_argument("--seq", type=int, help="bytes per sequence")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    p.add_argument("--clip", type=float, help="max global gradient norm")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files/folders (default: the standard library's .py files)")
    p.add_argument("--data-ext", nargs="+", metavar="SUFFIX",
                   help="keep only these suffixes when walking --data folders, e.g. .py .md")
    p.add_argument("--val-fraction", type=float, help="share of files held out")
    p.add_argument("--eval-every", type=int, help="validate every K steps")
    p.add_argument("--eval-windows", type=int, help="validation sequences per evaluation")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every K steps")
    p.add_argument("--seed", type=int, help="seed of init, data order and dropout")
    p.add_argument("--out", help="run folder (default runs/MODEL)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    def run(args: argparse.Namespace) -> int:
        from remat.train import main as train_main

        return train_main(args)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``remat`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="remat", description="Named, checked, measured rematerialization policies for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_policies(sub)
    _add_train(sub)
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
