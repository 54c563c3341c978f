"""The `fairpatch` command line. Heavy imports (torch, the service) happen inside the command that
needs them, so `fairpatch --help` and the SDK commands stay light. The gateway commands (`models`,
`datasets`, `jobs`, `patches`, `infer`) live in `clients.commands` and talk to a gateway over HTTP."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int | None]


def _add_model(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="reference biased models").add_subparsers(dest="model_cmd", required=True)
    train = model.add_parser("train", help="train (or fetch from cache) a reference model and export it to ONNX")
    train.add_argument("dataset", choices=["adult", "compas", "german"])
    train.add_argument("--sensitive", default=None, help="sensitive attribute (default: the dataset's usual one)")
    train.add_argument("--drop-sensitive", action="store_true", help="train without the sensitive column")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="where to write the .onnx file (metadata goes beside it)")
    train.set_defaults(run=_run_model_train)


def _run_model_train(args: argparse.Namespace) -> int:
    from patcher.reference_models import reference_model

    model = reference_model(args.dataset, args.sensitive, drop_sensitive=args.drop_sensitive, seed=args.seed,
                            progress=sys.stderr.isatty())
    path = model.save(args.out)
    print(f"wrote {path} (sha256 {model.sha256[:12]}, {len(model.metadata['feature_names'])} features)")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from clients.bench_cli import add_bench_parser

    add_bench_parser(sub)


def _add_methods(sub: argparse._SubParsersAction) -> None:
    from clients.methods_cli import add_methods_parser

    add_methods_parser(sub)


def _add_service(sub: argparse._SubParsersAction) -> None:
    try:
        from service.commands import add_service_parsers
    except ImportError as e:  # the service extra is not installed
        msg = f"the gateway needs the service extra: pip install 'fairpatch[service]' ({e})"
        for name in ("serve", "upstream"):
            sub.add_parser(name, help="(needs fairpatch[service])").set_defaults(run=lambda _a, m=msg: sys.exit(m))
        return
    add_service_parsers(sub)


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    from clients.commands import add_gateway_parsers

    add_gateway_parsers(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the end-to-end demo on embedded defaults")
    demo.add_argument("--queries", type=int, default=1000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--bias", default="estimator", choices=["estimator", "group"],
                      help="Eraser's bias features: estimator (no group needed at inference) or group (sent per row)")
    demo.add_argument("--report", default="fairpatch-demo-report.html",
                      help="where to write the job's HTML report (default: fairpatch-demo-report.html)")
    demo.set_defaults(run=lambda a: __import__("clients.demo", fromlist=["run"]).run(a))


def build_parser() -> argparse.ArgumentParser:
    from clients.commands import add_connection_options

    parser = argparse.ArgumentParser(prog="fairpatch", description="Fairness patches for deployed models.")
    add_connection_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_model, _add_methods, _add_bench, _add_service, _add_gateway, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code or 0)
