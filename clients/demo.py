"""`fairpatch demo` (what `make demo` runs): patch a biased Adult model through queries alone.

Until the gateway's end-to-end loop exists, the demo is the Eraser benchmark: train (or load from
cache) the biased reference model, give Eraser a query budget, and compare the model before and
after the patch on the held-out Adult test split, with the group at inference and without it.
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from clients.bench_cli import print_table
    from patcher.bench import bench_eraser

    console = Console()
    console.print(f"[bold]fairpatch demo[/]: Inference-Time Rule Eraser on Adult (sex), {args.queries} queries")
    for label, group_free in (("group sent at inference", False), ("no group at inference", True)):
        with console.status(f"fitting the Eraser patch ({label})"):
            result = bench_eraser("adult", "sex", "dp", args.queries, args.seed, group_free=group_free)
        print_table(result)
    console.print("Same model, same held-out test rows; only the patch differs. "
                  "Run `fairpatch bench eraser --help` for other datasets, criteria and budgets.")
    return 0
