"""`fairpatch patches promote` and `fairpatch patches fairness`: safe rollout and live figures (docs/rollout.md).

The figures of every arm (active, shadow, canary, control) are printed side by side, one column per arm and
output (raw, served, and a shadow's patched answer), so a canary's patched arm reads against its control.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_rollout_commands(cmds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from clients.commands import handles_errors

    pr = cmds.add_parser("promote", help="move a patch along shadow -> canary -> active", parents=[common])
    pr.add_argument("model")
    pr.add_argument("patch_id")
    pr.add_argument("--version", default="1")
    pr.add_argument("--stage", choices=["shadow", "canary", "active"], help="default: the next stage along")
    pr.add_argument("--percent", type=float, help="canary: the patched share of requests (default 10)")
    pr.add_argument("--force", action="store_true",
                    help="promote past shadow a patch that did not improve its criterion on its held-out rows")
    pr.set_defaults(run=handles_errors(_promote))
    fa = cmds.add_parser("fairness", help="live fairness of a version's served traffic, arms side by side",
                         parents=[common])
    fa.add_argument("model")
    fa.add_argument("--version", default="1")
    fa.add_argument("--window", type=float, help="seconds of traffic (default: the gateway's window)")
    fa.add_argument("--json", action="store_true")
    fa.set_defaults(run=handles_errors(_fairness))


def _promote(args: argparse.Namespace, client: Any) -> int:
    stage = client.promote_patch(args.model, args.patch_id, args.version, args.stage, args.percent, args.force)
    share = f" ({stage['percent']:g}% of requests)" if stage.get("percent") is not None else ""
    print(f"{args.model} version {args.version}: patch {args.patch_id} is now {stage['stage']}{share}")
    print_figures(client.fairness(args.model, args.version))
    return 0


def _fairness(args: argparse.Namespace, client: Any) -> int:
    from clients.commands import _print_json

    figures = client.fairness(args.model, args.version, args.window)
    if args.json:
        _print_json(figures)
        return 0
    print_figures(figures)
    return 0


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def rows_of(figures: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the arms side by side: a column per arm and output, a row per figure."""
    columns, cols = ["figure"], []
    for arm in figures["arms"]:
        for name, out in arm["outputs"].items():
            if name == "served" and arm["arm"] == "shadow":
                continue  # a shadow serves the raw answer: the same column twice
            columns.append(f"{arm['arm']} {name}" + (f" ({arm['patch'][:8]})" if arm["patch"] else ""))
            cols.append((arm, out))
    groups = sorted({g for arm in figures["arms"] for g in arm["rows_by_group"]})
    rows = [["rows", *(str(a["rows"]) for a, _ in cols)], ["labelled", *(str(a["labelled"]) for a, _ in cols)]]
    rows += [[f"selection rate {g}", *(_f(o["selection_rate"].get(g)) for _, o in cols)] for g in groups]
    rows.append(["dp gap", *(_f(o["dp_gap"]) for _, o in cols)])
    rows.append(["dp gap 95% CI", *(f"[{_f(o['dp_gap_ci'][0])}, {_f(o['dp_gap_ci'][1])}]" for _, o in cols)])
    rows.append(["eo gap", *(_f(o["eo_gap"]) for _, o in cols)])
    rows.append(["accuracy", *(_f(o["accuracy"]) for _, o in cols)])
    return columns, rows


def print_figures(figures: dict[str, Any]) -> None:
    from clients.commands import _table

    stage = figures.get("rollout") or {}
    where = f"{figures['model']} version {figures['version']}"
    status = "DRIFTING" if figures["drifting"] else "within the alert threshold"
    title = (f"live fairness of {where}, last {figures['window_s']:g}s ({stage.get('stage', 'no patch')}; "
             f"{status}: dp gap alert {figures['alert_gap']:g})")
    if not figures["arms"]:
        print(f"{title}: no traffic with groups recorded yet")
        return
    columns, rows = rows_of(figures)
    _table(title, columns, rows)
