"""`fairpatch bench <method>`: fit on the tune split, score on the test split, print JSON or a table.

Every registered method has a subcommand. Its options come from the method's options model: `-o key=value`
(repeatable; a value is read as JSON when it parses, else as a string) and `--preset NAME`, both validated
before anything is loaded. `--dataset --sensitive --criterion --queries --seed --json` are common; a method
may declare flags of its own that are not options (`Method.bench.flags`: eraser's --group-free,
--drop-sensitive, --proxies; trigger's --access, --sweep-lam, --transfer-seed; forml's --fine-tune). Every
method runs through the one runner, `patcher.pipeline.bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from patcher.methods import methods

    bench = sub.add_parser("bench", help="benchmark a debiasing method on a real dataset",
                           description="Fit a method on the tune split, score before/after on the held-out "
                                       "test split. One subcommand per method.")
    sub_methods = bench.add_subparsers(dest="method", metavar="method", required=True)
    for method in methods():
        name, defaults = method.name, method.bench
        p = sub_methods.add_parser(name, help=method.summary)
        p.add_argument("--dataset", default="adult", choices=defaults.datasets)
        p.add_argument("--sensitive", default=None,
                       help="sensitive attribute (default: the dataset's usual one, binary as in the literature): "
                            "NAME, NAME:all for every category (race:all), or several joined by commas for "
                            "their intersection (sex,race); cells too small on the tune split are pooled")
        p.add_argument("--criterion", default="dp", choices=defaults.criteria or method.criteria)
        p.add_argument("--queries", type=int, default=defaults.queries,
                       help="query budget (rows sent to the model)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("-o", "--option", dest="option", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a {name} option (repeatable; `fairpatch methods show {name}` lists them)")
        p.add_argument("--preset", default=None, choices=sorted(method.presets) or None,
                       help="a named set of the method's options (-o overrides it)"
                       + (f": {', '.join(sorted(method.presets))}" if method.presets else "; it has none"))
        for flag in defaults.flags:
            p.add_argument(flag.name, **flag.kwargs)
        # only this subcommand's own flags reach the bench (not the CLI's global --url, --timeout, ...)
        keys = tuple(a.dest for a in p._actions if a.dest not in ("help", "json", "option", "preset"))
        p.set_defaults(run=run_bench, bench_keys=keys)


def parse_option_flags(flags: list[str]) -> dict[str, Any]:
    """`key=value` strings -> {key: value}; a value is JSON when it parses (numbers, true, lists), else text."""
    out: dict[str, Any] = {}
    for flag in flags:
        key, sep, raw = flag.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"-o {flag!r}: write an option as KEY=VALUE, e.g. -o alpha_max=2")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def method_options(method: str, flags: list[str], preset: str | None) -> dict[str, Any]:
    """The options the run passes on: the preset's, then the -o flags, validated by the method's options model."""
    from patcher.methods import get_method

    m = get_method(method)
    options = parse_option_flags(flags)
    m.parse_options(options, preset)  # raises OptionsError naming the bad option or preset and the valid ones
    return {**m.presets[preset], **options} if preset is not None else options


def run_bench(args: argparse.Namespace) -> int:
    from patcher.methods import get_method
    from patcher.pipeline import bench

    kwargs = {k: getattr(args, k) for k in args.bench_keys}
    try:
        options = method_options(args.method, args.option, args.preset)
        clash = sorted(set(options) & set(kwargs))
        if clash:
            raise ValueError(f"{', '.join(clash)}: give {'it' if len(clash) == 1 else 'them'} as the bench's own "
                             f"--{clash[0].replace('_', '-')} flag, not as -o")
        result = bench(args.method, **kwargs, **options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        own = get_method(args.method).bench.print_result
        if own is None or not own(result):
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
