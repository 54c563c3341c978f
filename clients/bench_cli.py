"""`fairpatch bench <method>`: fit on the tune split, score on the test split, print JSON or a table."""

from __future__ import annotations

import argparse
import json
import sys

METHODS = ("eraser",)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark a debiasing method on a real dataset")
    bench.add_argument("method", choices=METHODS)
    bench.add_argument("--dataset", default="adult", choices=["adult", "compas", "german"])
    bench.add_argument("--sensitive", default=None, help="sensitive attribute (default: the dataset's usual one)")
    bench.add_argument("--criterion", default="dp", choices=["dp", "eo", "eopp"])
    bench.add_argument("--queries", type=int, default=1000, help="query budget (rows sent to the model)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--group-free", action="store_true", help="no group at inference: infer it from x")
    bench.add_argument("--drop-sensitive", action="store_true",
                       help="the model never saw the sensitive column (implies proxies only)")
    bench.add_argument("--proxies", default=None,
                       help="comma-separated raw columns to use as bias features (e.g. relationship,marital_status) "
                            "instead of the group; no group is needed at inference")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from patcher.bench import BENCHES

    try:
        result = BENCHES[args.method](
            dataset=args.dataset, sensitive=args.sensitive, criterion=args.criterion, queries=args.queries,
            seed=args.seed, group_free=args.group_free, drop_sensitive=args.drop_sensitive,
            proxies=args.proxies.split(",") if args.proxies else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{result['method']} on {result['dataset']} ({result['sensitive']}), criterion {result['criterion']}, "
             f"{result['queries_used']} queries, group at inference: {'yes' if result['group_at_inference'] else 'no'}")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for key, b in result["before"].items():
        a = result["after"].get(key)
        table.add_row(key, f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f}")
    Console().print(table)
    print(f"fit {result['fit_seconds']:.2f}s, alpha {result['alpha']:.3f}, threshold {result['threshold']:.3f}")
