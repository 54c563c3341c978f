"""`fairpatch bench <method>`: fit on the tune split, score on the test split, print JSON or a table."""

from __future__ import annotations

import argparse
import json
import sys

ALL_DATASETS = ("adult", "compas", "german", "colored-digits", "noisy-digits")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from patcher.benches import available, get_bench

    bench = sub.add_parser("bench", help="benchmark a debiasing method on a real dataset",
                           description="Fit a method on the tune split, score before/after on the held-out "
                                       "test split. One subcommand per method.")
    methods = bench.add_subparsers(dest="method", metavar="method", required=True)
    for name in available():
        module = get_bench(name)
        p = methods.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        p.add_argument("--dataset", default="adult", choices=getattr(module, "DATASETS", ALL_DATASETS))
        p.add_argument("--sensitive", default=None, help="sensitive attribute (default: the dataset's usual one)")
        p.add_argument("--criterion", default="dp", choices=getattr(module, "CRITERIA", ("dp", "eo", "eopp")))
        p.add_argument("--queries", type=int, default=getattr(module, "DEFAULT_QUERIES", 1000),
                       help="query budget (rows sent to the model)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)
        # only this subcommand's own options reach the bench (not the CLI's global --url, --timeout, ...)
        keys = tuple(a.dest for a in p._actions if a.dest not in ("help", "json"))
        p.set_defaults(run=run_bench, bench_keys=keys)


def run_bench(args: argparse.Namespace) -> int:
    from patcher.benches import get_bench

    kwargs = {k: getattr(args, k) for k in args.bench_keys}
    try:
        result = get_bench(args.method).run(**kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    elif hasattr(get_bench(args.method), "print_result"):
        get_bench(args.method).print_result(result)
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
    extras = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and k not in ("seed", "queries_used", "fit_seconds", "n_tune", "n_test")}
    print(f"fit {result['fit_seconds']:.2f}s" + "".join(f", {k} {v:.4g}" for k, v in extras.items()))
