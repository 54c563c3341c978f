"""`fairpatch methods`: the registered debiasing methods, read from the registry (no gateway needed).

`fairpatch methods` lists them (name, access, group at inference, summary); `fairpatch methods show NAME`
lists every option (name, type, default, description) and the presets; `--markdown` prints
docs/methods.md, which is generated from the same registry.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

GROUP_AT_INFERENCE = {"required": "yes", "none": "no", "optional": "depends on options"}


def add_methods_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="the debiasing methods, their options and presets")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--markdown", action="store_true", help="print docs/methods.md (every method and option)")
    p.set_defaults(run=run_list)
    show = p.add_subparsers(dest="methods_cmd", metavar="show").add_parser(
        "show", help="one method: every option (type, default, description) and its presets")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=run_show)


def _show_default(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def run_list(args: argparse.Namespace) -> int:
    from patcher.methods import methods

    if args.markdown:
        print(markdown(), end="")
        return 0
    if args.json:
        print(json.dumps([m.describe() for m in methods()], indent=1, default=str))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="debiasing methods (`fairpatch methods show NAME` for options)")
    table.add_column("name", no_wrap=True)
    for col in ("access", "group at inference", "summary"):
        table.add_column(col, overflow="fold")
    for m in methods():
        table.add_row(m.name, ", ".join(m.access), GROUP_AT_INFERENCE[m.group_at_inference], escape(m.summary))
    Console().print(table)
    return 0


def run_show(args: argparse.Namespace) -> int:
    import sys

    from patcher.methods import OptionsError, get_method, option_rows

    try:
        m = get_method(args.name)
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(m.describe(), indent=1, default=str))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{m.name}[/bold]: {escape(m.summary)}")
    console.print(f"access: {', '.join(m.access)} (default {m.default_access}); criteria: {', '.join(m.criteria)}; "
                  f"group at inference: {GROUP_AT_INFERENCE[m.group_at_inference]}")
    table = Table(title=f"{m.name} options (-o key=value in `fairpatch bench`, `options` in a job)")
    table.add_column("option", no_wrap=True)
    for col in ("type", "default", "description"):
        table.add_column(col, overflow="fold")
    for row in option_rows(m.options):
        table.add_row(*(escape(x) for x in (row["name"], row["type"], _show_default(row["default"]),
                                            row["description"])))
    console.print(table)
    if m.presets:
        for name, values in m.presets.items():
            console.print(f"preset [bold]{escape(name)}[/bold]: " + escape(", ".join(
                f"{k}={_show_default(v)}" for k, v in values.items())))
    else:
        console.print("presets: none")
    return 0


def markdown() -> str:
    """docs/methods.md: every method with its access, inference needs, options and presets."""
    from patcher.methods import methods, option_rows

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    ms = methods()
    lines = ["# Methods", "",
             "Generated from the method registry (`patcher.methods`) by `fairpatch methods --markdown`; "
             "tests/test_methods.py fails when this file is stale. A job passes options as `options` and a "
             "preset as `preset` (`POST /v1/jobs`); `fairpatch bench <method>` takes `-o key=value` and "
             "`--preset NAME`.", "",
             "| method | access | group at inference | summary |", "|---|---|---|---|"]
    lines += [f"| [{m.name}](#{m.name.replace('_', '-')}) | {', '.join(m.access)} | "
              f"{GROUP_AT_INFERENCE[m.group_at_inference]} | {cell(m.summary)} |" for m in ms]
    for m in ms:
        lines += ["", f"## {m.name}", "", cell(m.summary) + ".", "",
                  f"Access: {', '.join(m.access)} (default {m.default_access}). Criteria: {', '.join(m.criteria)}. "
                  "Group at inference: "
                  f"{GROUP_AT_INFERENCE[m.group_at_inference]}."
                  + (" Takes an exemplar dataset." if m.takes_exemplar else ""), "",
                  "| option | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{r['name']}` | {cell(r['type'])} | `{_show_default(r['default'])}` | {cell(r['description'])} |"
                  for r in option_rows(m.options)]
        for name, values in m.presets.items():
            lines += ["", f"Preset `{name}`: " + ", ".join(f"`{k}={_show_default(v)}`" for k, v in values.items())
                      + "."]
    return "\n".join(lines) + "\n"
