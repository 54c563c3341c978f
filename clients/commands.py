"""The CLI's gateway commands, all over the SDK: `fairpatch models|datasets|jobs|patches|infer`.

Every command takes `--url` ($FAIRPATCH_URL, default http://127.0.0.1:8080) and `--admin-key`
($FAIRPATCH_ADMIN_KEY), before or after the subcommand. A refused request prints the gateway's own
message and exits 1; usage errors exit 2 (argparse). Records print as JSON, lists as tables
(`--json` for JSON), so the output can be read by people and by scripts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from clients.live_cli import add_rollout_commands
from clients.sdk import DEFAULT_URL, Client, FairpatchError, Job, ModelSpec, UpstreamSpec

Runner = Callable[[argparse.Namespace], int | None]


def add_connection_options(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """`--url` / `--admin-key`. On the top-level parser they carry the defaults; on subcommands they are
    SUPPRESSed unless given, so `fairpatch --url X jobs list` and `fairpatch jobs list --url X` both work."""
    group = parser.add_argument_group("gateway connection")
    url_default = (os.environ.get("FAIRPATCH_URL") or DEFAULT_URL) if top_level else argparse.SUPPRESS
    key_default = os.environ.get("FAIRPATCH_ADMIN_KEY") if top_level else argparse.SUPPRESS
    group.add_argument("--url", default=url_default,
                       help=f"gateway base URL (default: $FAIRPATCH_URL or {DEFAULT_URL})")
    group.add_argument("--admin-key", default=key_default,
                       help="admin key for the management endpoints (default: $FAIRPATCH_ADMIN_KEY)")
    group.add_argument("--timeout", type=float, default=30.0 if top_level else argparse.SUPPRESS,
                       help="per-request timeout in seconds (default: 30)")


def _client(args: argparse.Namespace) -> Client:
    url = getattr(args, "url", None) or os.environ.get("FAIRPATCH_URL") or DEFAULT_URL
    key = getattr(args, "admin_key", None) or os.environ.get("FAIRPATCH_ADMIN_KEY")
    return Client(url, key, timeout=getattr(args, "timeout", 30.0))


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def handles_errors(run: Callable[[argparse.Namespace, Client], int | None]) -> Runner:
    """Run with a client; the gateway's refusals and local problems become one line on stderr."""
    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return run(args, client) or 0
        except FairpatchError as e:
            return _fail(f"{e.message} (HTTP {e.status})" if e.status else e.message)
        except TimeoutError as e:
            return _fail(str(e))
        except BrokenPipeError:  # `fairpatch infer ... | head`: the reader has all it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (OSError, ValueError) as e:  # unreadable file, bad CSV, bad JSON option
            return _fail(str(e))
    return wrapper


def _print_json(obj: Any) -> None:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    print(json.dumps(obj, indent=2))


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: whole ids, no wrapping


def _when(t: float | None) -> str:
    if t is None:
        return ""
    import datetime as dt

    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


# --- models ------------------------------------------------------------------------------------------

def _add_models(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    models = sub.add_parser("models", help="register and inspect upstream models (admin)", parents=[common])
    cmds = models.add_subparsers(dest="models_cmd", required=True)

    reg = cmds.add_parser("register", help="register a model version and its upstream endpoint", parents=[common])
    reg.add_argument("name", nargs="?", help="model name (in /v2/models/{name})")
    reg.add_argument("--spec", help="a JSON file with the whole model spec (docs/api.md) instead of the flags")
    reg.add_argument("--version", default="1")
    reg.add_argument("--upstream-url", help="base URL of the model server, e.g. http://127.0.0.1:9000")
    reg.add_argument("--protocol", default="v2", choices=["v2", "v1", "mlflow"])
    reg.add_argument("--upstream-model", help="the upstream's name for the model (default: the name)")
    reg.add_argument("--upstream-version", help="the upstream's version, if it wants one in the path")
    reg.add_argument("--input-name", help="the upstream's input tensor")
    reg.add_argument("--output-name", help="the upstream's scores output")
    reg.add_argument("--output-kind", default="logits", choices=["logits", "probabilities"])
    reg.add_argument("--upstream-timeout", type=float, default=10.0, help="seconds (default: 10)")
    reg.add_argument("--binary-data", action=argparse.BooleanOptionalAction, default="auto",
                     help="v2: send the upstream tensors as binary data and ask for binary outputs (the binary "
                          "tensor extension; Triton and `fairpatch upstream` speak it): cheaper for large batches. "
                          "Default: where the upstream's GET /v2 advertises it")
    reg.add_argument("--group-input", default="group", help="input tensor carrying the group (default: group)")
    reg.add_argument("--groups", help="comma-separated known group names, e.g. Female,Male")
    reg.set_defaults(run=_models_register)

    ls = cmds.add_parser("list", help="registered model versions", parents=[common])
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_models_list)
    for name, run, what in (("get", _models_get, "one model version's spec (JSON)"),
                            ("delete", _models_delete, "unregister a model version"),
                            ("check", _models_check, "read the upstream again and check the registration against "
                                                     "it (and a dataset's first rows: --dataset)")):
        p = cmds.add_parser(name, help=what, parents=[common])
        p.add_argument("name")
        p.add_argument("--version", default="1")
        if name == "check":
            p.add_argument("--dataset", help="an uploaded dataset whose first rows probe the output kind")
            p.add_argument("--rows", type=int, default=8, help="how many of its rows (default: 8)")
        p.set_defaults(run=run)

    art = cmds.add_parser("artifact", help="the model version's ONNX file, for gradient and weight-access jobs",
                          parents=[common])
    art_cmds = art.add_subparsers(dest="artifact_cmd", required=True)
    up = art_cmds.add_parser("upload", help="upload the ONNX file (opset <= 17)", parents=[common])
    up.add_argument("name")
    up.add_argument("version")
    up.add_argument("file", help="the model as .onnx")
    up.set_defaults(run=_artifact_upload)
    dl = art_cmds.add_parser("download", help="save the uploaded ONNX file", parents=[common])
    dl.add_argument("name")
    dl.add_argument("version")
    dl.add_argument("--output", "-o", help="file to write (default: NAME-VERSION.onnx)")
    dl.set_defaults(run=_artifact_download)
    for name, run, what in (("get", _artifact_get, "the artifact's sha256, size, opset and signature (JSON)"),
                            ("delete", _artifact_delete, "drop the uploaded ONNX file")):
        p = art_cmds.add_parser(name, help=what, parents=[common])
        p.add_argument("name")
        p.add_argument("version")
        p.set_defaults(run=run)


@handles_errors
def _models_register(args: argparse.Namespace, client: Client) -> int:
    if args.spec:
        with open(args.spec) as fh:
            spec: ModelSpec | dict = json.load(fh)
    else:
        if not args.name or not args.upstream_url:
            return _fail("give the model NAME and --upstream-url (or a --spec file)", 2)
        spec = ModelSpec(
            name=args.name, version=args.version,
            upstream=UpstreamSpec(url=args.upstream_url, protocol=args.protocol, model_name=args.upstream_model,
                                  model_version=args.upstream_version, input_name=args.input_name,
                                  output_name=args.output_name, output_kind=args.output_kind,
                                  timeout_s=args.upstream_timeout, binary_data=args.binary_data),
            group_input=args.group_input, groups=args.groups.split(",") if args.groups else None)
    _print_json(client.register_model(spec))
    return 0


@handles_errors
def _models_list(args: argparse.Namespace, client: Client) -> int:
    models = client.list_models()
    if args.json:
        _print_json([m.model_dump(mode="json") for m in models])
        return 0
    _table(f"{len(models)} model version(s)", ["name", "version", "upstream", "protocol", "output", "groups"],
           [[m.name, m.version, m.upstream.url, m.upstream.protocol, m.upstream.output_kind,
             ",".join(m.groups or [])] for m in models])
    return 0


@handles_errors
def _models_get(args: argparse.Namespace, client: Client) -> int:
    _print_json(client.get_model(args.name, args.version))
    return 0


@handles_errors
def _models_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_model(args.name, args.version)
    print(f"deleted {args.name} version {args.version}")
    return 0


@handles_errors
def _artifact_upload(args: argparse.Namespace, client: Client) -> int:
    _print_json(client.upload_artifact(args.name, args.file, args.version))
    return 0


@handles_errors
def _artifact_get(args: argparse.Namespace, client: Client) -> int:
    _print_json(client.get_artifact(args.name, args.version))
    return 0


@handles_errors
def _artifact_download(args: argparse.Namespace, client: Client) -> int:
    path = args.output or f"{args.name}-{args.version}.onnx"
    data = client.download_artifact(args.name, args.version, path)
    print(f"wrote {len(data)} bytes to {path}")
    return 0


@handles_errors
def _artifact_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_artifact(args.name, args.version)
    print(f"deleted the artifact of {args.name} version {args.version}")
    return 0


# --- datasets ----------------------------------------------------------------------------------------

def _add_datasets(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ds = sub.add_parser("datasets", help="upload tuning data (admin)", parents=[common])
    cmds = ds.add_subparsers(dest="datasets_cmd", required=True)
    up = cmds.add_parser("upload", help="upload a CSV or Parquet file: feature columns + label + group",
                         parents=[common])
    up.add_argument("file", help=".csv, .csv.gz or .parquet; every column but the label and group is a model input")
    up.add_argument("--label", required=True, help="the binary label column")
    up.add_argument("--group", required=True, help="the group column (its values are the group names)")
    up.add_argument("--name", help="a name to remember it by")
    up.add_argument("--json", action="store_true", help="print the whole summary as JSON (default: one line)")
    up.set_defaults(run=_datasets_upload)
    for name, run, what in (("get", _datasets_get, "a dataset's summary (JSON)"),
                            ("delete", _datasets_delete, "delete a dataset")):
        p = cmds.add_parser(name, help=what, parents=[common])
        p.add_argument("id")
        p.set_defaults(run=run)


@handles_errors
def _datasets_upload(args: argparse.Namespace, client: Client) -> int:
    info = client.upload_dataset(args.file, label=args.label, group=args.group, name=args.name)
    if args.json:
        _print_json(info)
    else:  # one line: the full summary lists every column (`fairpatch datasets get ID` prints it)
        print(info.one_line())
    return 0


@handles_errors
def _models_check(args: argparse.Namespace, client: Client) -> int:
    found = client.check_model(args.name, args.version, dataset=args.dataset, rows=args.rows)
    seen = found.get("output_kind_seen")
    print(f"model {args.name} version {args.version}: upstream "
          f"{'answers' if found.get('checked') else 'not checked'}; output kind seen: {seen or 'not probed'}")
    for note in found.get("notes") or []:
        print(f"  - {note}")
    return 0


@handles_errors
def _datasets_get(args: argparse.Namespace, client: Client) -> int:
    _print_json(client.get_dataset(args.id))
    return 0


@handles_errors
def _datasets_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_dataset(args.id)
    print(f"deleted dataset {args.id}")
    return 0


# --- jobs --------------------------------------------------------------------------------------------

def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"options are KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, lists; anything else stays a string
    except ValueError:
        return key, value


def _add_jobs(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser("jobs", help="train patches (admin)", parents=[common])
    cmds = jobs.add_subparsers(dest="jobs_cmd", required=True)
    create = cmds.add_parser("create", help="start a patch-training job", parents=[common])
    create.add_argument("--model", required=True)
    create.add_argument("--version", help="model version (default: the latest)")
    create.add_argument("--dataset", required=True, help="dataset id (from `datasets upload`)")
    create.add_argument("--method", default="eraser")
    create.add_argument("--access", choices=["queries", "zeroth_order", "gradient", "weights"],
                        help="how the method reaches the model (default: the least privileged it supports; "
                             "gradient and weights need `models artifact upload` first)")
    create.add_argument("--exemplar-dataset", help="a second dataset id, for methods that take one (forml)")
    create.add_argument("--criterion", default="dp", choices=["dp", "eo", "eopp"])
    create.add_argument("--queries", type=int, default=1000, help="query budget: rows sent to the model")
    create.add_argument("--holdout", type=float, default=0.3,
                        help="share of the dataset kept for the report (0: no held-out report)")
    create.add_argument("--eval-budget", type=int,
                        help="held-out rows sent to the model to score the patch (default: 2000); the job sends at "
                             "most --queries + --eval-budget rows")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--option", "-o", action="append", type=_option, default=[], metavar="KEY=VALUE",
                        help="method option, repeatable (e.g. -o bias=estimator; `fairpatch methods show NAME`)")
    create.add_argument("--preset", help="a named set of the method's options (`fairpatch methods show NAME`)")
    create.add_argument("--wait", action="store_true", help="wait for it, with a progress bar")
    create.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds to wait (default: 3600)")
    create.set_defaults(run=_jobs_create)

    ls = cmds.add_parser("list", help="recent jobs", parents=[common])
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_jobs_list)
    for name, run, what in (("get", _jobs_get, "a job's record (JSON)"), ("cancel", _jobs_cancel, "cancel a job"),
                            ("wait", _jobs_wait, "wait for a job, with a progress bar"),
                            ("condense", _jobs_condense, "store the job's dataset without the rows its sample audit "
                                                         "drops (forml); prints the new dataset")):
        p = cmds.add_parser(name, help=what, parents=[common])
        p.add_argument("id")
        if name == "wait":
            p.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds to wait (default: 3600)")
        p.set_defaults(run=run)


def wait_with_progress(client: Client, job_id: str, timeout: float | None, title: str = "job") -> Job:
    """`Client.wait_job` behind a rich progress bar: fraction, queries used, stage (plain lines without a tty)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    client.get_job(job_id)  # an unknown id is a 404 before any bar is drawn
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[queries]} queries"), TextColumn("[dim]{task.fields[stage]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"{title} {job_id[:12]}", total=1.0, queries=0, stage="queued")

        def show(job: Job) -> None:
            p = job.progress
            done = 1.0 if job.status == "succeeded" else p.fraction
            bar.update(task, completed=done, queries=p.queries_used, stage=p.stage or job.status)

        return client.wait_job(job_id, progress=show, timeout=timeout)


def _job_summary(job: Job) -> int:
    """Print how a finished job ended; exit code 0 only when it succeeded."""
    if job.status != "succeeded":
        detail = f": {job.error}" if job.error else ""
        return _fail(f"job {job.id} {job.status}{detail}")
    result = job.result
    if result is None:
        _print_json(job)
        return 0
    print(f"job {job.id} succeeded: patch {result.patch_id} ({result.queries_used} queries, "
          f"{result.eval_queries} for the evaluation)")
    if result.note:
        print(result.note)
    keys = [k for k in result.before if isinstance(result.before[k], (int, float))]
    if keys:
        rows = [[k, f"{result.before[k]:.4f}", f"{result.after.get(k, float('nan')):.4f}",
                 f"{result.after.get(k, float('nan')) - result.before[k]:+.4f}"] for k in keys]
        _table("held-out report", ["metric", "before", "after", "change"], rows)
    if result.served_by == "patch":
        print("a weight patch: while it is active the gateway serves its model itself, without the upstream")
    held = getattr(result, "held_out", None)
    if held:
        lo, hi = held["change_ci"]
        print(f"held-out verdict: {held['verdict']} ({held['criterion']} gap {held['gap_before']:.3f} -> "
              f"{held['gap_after']:.3f}, change {held['change']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}])")
    warning = (getattr(result, "report", None) or {}).get("warning")
    if warning:
        print(f"warning: {warning}")
    print(f"activate it: fairpatch patches activate {job.model} {result.patch_id} --version {job.version}")
    return 0


@handles_errors
def _jobs_create(args: argparse.Namespace, client: Client) -> int:
    job = client.create_job(args.model, args.dataset, version=args.version, method=args.method,
                            criterion=args.criterion, query_budget=args.queries, holdout=args.holdout,
                            seed=args.seed, options=dict(args.option), access=args.access,
                            exemplar_dataset=args.exemplar_dataset, preset=args.preset,
                            eval_budget=args.eval_budget)
    if not args.wait:
        _print_json(job)
        return 0
    print(f"job {job.id} queued", file=sys.stderr)
    return _job_summary(wait_with_progress(client, job.id, args.wait_timeout, title=f"{args.method} job"))


@handles_errors
def _jobs_wait(args: argparse.Namespace, client: Client) -> int:
    return _job_summary(wait_with_progress(client, args.id, args.wait_timeout))


@handles_errors
def _jobs_condense(args: argparse.Namespace, client: Client) -> int:
    _print_json(client.condensed_dataset(args.id))
    return 0


@handles_errors
def _jobs_get(args: argparse.Namespace, client: Client) -> int:
    _print_json(client.get_job(args.id))
    return 0


@handles_errors
def _jobs_cancel(args: argparse.Namespace, client: Client) -> int:
    client.cancel_job(args.id)
    print(f"cancelling job {args.id}")
    return 0


@handles_errors
def _jobs_list(args: argparse.Namespace, client: Client) -> int:
    jobs = client.list_jobs()
    if args.json:
        _print_json([j.model_dump(mode="json") for j in jobs])
        return 0
    _table(f"{len(jobs)} job(s)", ["id", "status", "method", "model", "progress", "queries", "patch", "created"],
           [[j.id, j.status, j.method, f"{j.model}/{j.version}", f"{j.progress.fraction:.0%}",
             j.progress.queries_used, (j.result.patch_id or "")[:12] if j.result else "", _when(j.created_at)]
            for j in jobs])
    return 0


# --- patches -----------------------------------------------------------------------------------------

def _add_patches(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    patches = sub.add_parser("patches", help="list, activate and move patches (admin)", parents=[common])
    cmds = patches.add_subparsers(dest="patches_cmd", required=True)
    ls = cmds.add_parser("list", help="a model version's patches and which one is active", parents=[common])
    ls.add_argument("model")
    ls.add_argument("--version", default="1")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_patches_list)
    act = cmds.add_parser("activate", help="serve a patch for a model version", parents=[common])
    act.add_argument("model")
    act.add_argument("patch_id")
    act.add_argument("--version", default="1")
    act.add_argument("--force", action="store_true",
                     help="activate a patch that did not improve its criterion on its held-out rows")
    act.set_defaults(run=_patches_activate)
    de = cmds.add_parser("deactivate", help="serve a model version unpatched", parents=[common])
    de.add_argument("model")
    de.add_argument("--version", default="1")
    de.set_defaults(run=_patches_deactivate)
    dl = cmds.add_parser("download", help="save a patch's bytes (a .fpatch zip)", parents=[common])
    dl.add_argument("patch_id")
    dl.add_argument("--out", "-o", help="file to write (default: <id>.fpatch)")
    dl.set_defaults(run=_patches_download)
    up = cmds.add_parser("upload", help="upload a patch file for a model version", parents=[common])
    up.add_argument("model")
    up.add_argument("file")
    up.add_argument("--version", default="1")
    up.set_defaults(run=_patches_upload)
    _add_patches_export(cmds, common)
    add_rollout_commands(cmds, common)


@handles_errors
def _patches_list(args: argparse.Namespace, client: Client) -> int:
    listing = client.list_patches(args.model, args.version)
    if args.json:
        _print_json(listing)
        return 0
    _table(f"patches for {args.model} version {args.version} (active: {listing.active or 'none'})",
           ["id", "method", "group at inference", "created", "active"],
           [[p.id, p.method, {True: "yes", False: "no"}.get(p.group_at_inference, ""), _when(p.created_at),
             "*" if p.id == listing.active else ""] for p in listing.patches])
    return 0


@handles_errors
def _patches_activate(args: argparse.Namespace, client: Client) -> int:
    client.activate_patch(args.model, args.patch_id, args.version, force=args.force)
    print(f"{args.model} version {args.version} now serves patch {args.patch_id}")
    return 0


@handles_errors
def _patches_deactivate(args: argparse.Namespace, client: Client) -> int:
    client.deactivate_patch(args.model, args.version)
    print(f"{args.model} version {args.version} now serves unpatched")
    return 0


@handles_errors
def _patches_download(args: argparse.Namespace, client: Client) -> int:
    out = args.out or f"{args.patch_id}.fpatch"
    data = client.download_patch(args.patch_id, out)
    print(f"wrote {out} ({len(data)} bytes)")
    return 0


@handles_errors
def _patches_upload(args: argparse.Namespace, client: Client) -> int:
    pid = client.upload_patch(args.model, args.file, args.version)
    print(pid)
    return 0


def _add_patches_export(cmds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ex = cmds.add_parser("export", parents=[common],
                         help="the patched model as one ONNX file (--out) or a Triton ensemble (--triton-repo), "
                              "to serve without the gateway (docs/export.md)")
    ex.add_argument("patch", help="a .fpatch file, or a patch id on the gateway")
    where = ex.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", "-o", help="write one ONNX model: the model and the patch composed")
    where.add_argument("--triton-repo", help="write a Triton model repository: the patch's models and an ensemble "
                                            "around the model Triton serves")
    ex.add_argument("--model", help="the model's ONNX file (default: the version's uploaded artifact on the gateway)")
    ex.add_argument("--for", dest="for_model", metavar="MODEL",
                    help="take names and output kind from this model's registration on the gateway (default: the "
                         "model a patch id is bound to)")
    ex.add_argument("--version", default=None, help="the registered version (default: the patch's, else 1)")
    ex.add_argument("--output-kind", choices=["logits", "probabilities"],
                    help="what the model's scores are (default: the registration's, else logits)")
    ex.add_argument("--input-name", help="the model's feature input (default: the registration's, else the only one)")
    ex.add_argument("--output-name", help="the model's scores output (default: the registration's, else the first)")
    ex.add_argument("--group-input", help="name of the extra group input, INT64 ids (default: the registration's, "
                                          "else group)")
    ex.add_argument("--uniform-input", action="store_true",
                    help="for randomized patches: an extra FP32 input fairpatch_uniform takes the draws")
    ex.add_argument("--triton-model", help="the model's name in Triton (default: the registration's upstream "
                                           "model_name)")
    ex.add_argument("--triton-version", help="the model's version in Triton (default: the registration's upstream "
                                             "model_version, else the latest)")
    ex.add_argument("--ensemble-name", help="the ensemble's name (default: <triton model>_fairpatch)")
    ex.set_defaults(run=_patches_export)


def _export_sources(args: argparse.Namespace, client: Client) -> tuple[Any, ModelSpec | None, str | None]:
    """(the patch, the registration to take defaults from or None, the version)."""
    from pathlib import Path

    from patcher.patch import Patch

    local = Path(args.patch).is_file()
    if not local and (args.patch.endswith((".fpatch", ".zip")) or os.sep in args.patch):
        raise OSError(f"no patch file {args.patch}; give a .fpatch file or a patch id on the gateway")
    patch = Patch.load(args.patch) if local else Patch.from_bytes(client.download_patch(args.patch), args.patch)
    bound = patch.manifest.get("model") or {}
    name = args.for_model or (None if local else bound.get("name"))
    version = args.version or (str(bound["version"]) if bound.get("version") is not None else None)
    spec = client.get_model(name, version or "1") if name else None
    return patch, spec, version or "1"


@handles_errors
def _patches_export(args: argparse.Namespace, client: Client) -> int:
    from pathlib import Path

    from patcher.export import (
        export_patched_model,
        export_triton_repo,
        graph_inputs,
        graph_outputs,
        v2_tensor_spec,
    )

    patch, spec, version = _export_sources(args, client)
    up = spec.upstream if spec is not None else None
    kind = args.output_kind or (up.output_kind if up else "logits")
    input_name = args.input_name or (up.input_name if up else None)
    output_name = args.output_name or (up.output_name if up else None)
    group_input = args.group_input or (spec.group_input if spec else "group")
    model = Path(args.model).read_bytes() if args.model else None
    weight_patch = patch.part("replacement_model") is not None
    if args.out:
        if model is None and not weight_patch:
            if spec is None:
                return _fail("give the model's ONNX file (--model), or the model registered on the gateway (--for)")
            model = client.download_artifact(spec.name, version)
        data = export_patched_model(patch, model, output_kind=kind, input_name=input_name, output_name=output_name,
                                    group_input=group_input, uniform_input=args.uniform_input)
        Path(args.out).write_bytes(data)
        print(f"wrote {args.out} ({len(data)} bytes): patch {patch.id[:12]} ({patch.method}) composed in")
        return 0
    if model is not None:
        import onnx

        m = onnx.load_from_string(model)
        ins, outs = graph_inputs(m), graph_outputs(m)
    elif spec is not None:  # the signature the gateway reads from the upstream, i.e. from Triton itself
        meta = client.model_metadata(spec.name, version)
        ins = [v2_tensor_spec(t) for t in meta.get("inputs", []) if t.get("name") != spec.group_input]
        outs = [v2_tensor_spec(t) for t in meta.get("outputs", [])]
    else:
        return _fail("give the model's ONNX file (--model) or its registration on the gateway (--for) for its "
                     "tensor names and shapes")
    features = next((t for t in ins if t.name == input_name), None) if input_name else (ins[0] if len(ins) == 1
                                                                                      else None)
    scores = next((t for t in outs if t.name == output_name), None) if output_name else (outs[0] if outs else None)
    if features is None or scores is None:
        return _fail(f"cannot tell the model's feature input and scores output apart (inputs: "
                     f"{', '.join(t.name for t in ins)}; outputs: {', '.join(t.name for t in outs)}); pass "
                     "--input-name and --output-name")
    triton_model = args.triton_model or (up.model_name or spec.name if spec else None)
    if triton_model is None:
        return _fail("name the model as Triton serves it (--triton-model)")
    triton_version = args.triton_version or (up.model_version if up else None)
    written = export_triton_repo(patch, args.triton_repo, model_name=triton_model, model_version=triton_version,
                                 features=features, scores=scores, output_kind=kind, group_input=group_input,
                                 ensemble_name=args.ensemble_name, uniform_input=args.uniform_input)
    for path in written:
        print(path)
    print(f"Triton repository {args.triton_repo}: put {triton_model}'s own model directory beside these",
          file=sys.stderr)
    return 0


# --- infer -------------------------------------------------------------------------------------------

def _add_infer(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("infer", help="send a CSV's rows through the gateway and print the predictions",
                       parents=[common],
                       description="Every numeric column is a model input, in file order, except the group and "
                                   "--drop columns. Prints CSV: row, prediction, scores (and raw scores).")
    p.add_argument("model")
    p.add_argument("file", help="a CSV file ('-' for stdin)")
    p.add_argument("--version", help="model version (default: the latest)")
    p.add_argument("--group-column", help="column holding each row's group (sent as the group input)")
    p.add_argument("--drop", action="append", default=[], metavar="COLUMN",
                   help="a column that is not a model input (e.g. the label); repeatable")
    p.add_argument("--raw", action="store_true", help="also print the upstream's unpatched scores")
    p.add_argument("--batch", type=int, default=256, help="rows per request (default: 256)")
    p.add_argument("--input-name", help="the model's input tensor (default: read from its metadata)")
    p.add_argument("--group-input", default="group", help="the group input's name (default: group)")
    p.set_defaults(run=_infer)


@handles_errors
def _infer(args: argparse.Namespace, client: Client) -> int:
    import numpy as np
    import pandas as pd

    frame = pd.read_csv(sys.stdin if args.file == "-" else args.file)
    skip = set(args.drop) | ({args.group_column} if args.group_column else set())
    missing = sorted(c for c in skip if c not in frame.columns)
    if missing:
        return _fail(f"no column(s) {', '.join(missing)} in {args.file} (columns: {', '.join(frame.columns)})", 2)
    features = [c for c in frame.columns if c not in skip]
    bad = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        return _fail(f"column(s) {', '.join(bad)} are not numeric; --drop them or pass --group-column", 2)
    if args.batch < 1:
        return _fail("--batch must be at least 1", 2)
    X = frame[features].to_numpy(np.float32)
    groups = frame[args.group_column].astype(str).to_numpy() if args.group_column else None
    out = sys.stdout
    patches: set[str] = set()
    for start in range(0, len(X), args.batch):
        stop = start + args.batch
        res = client.infer(args.model, X[start:stop], None if groups is None else groups[start:stop],
                           version=args.version, raw=args.raw, input_name=args.input_name,
                           group_input=args.group_input)
        patches.add(res.patch_id or "none")
        scores = res.scores.reshape(len(res.scores), -1)
        raw = res.raw.reshape(len(res.raw), -1) if res.raw is not None else None
        if start == 0:
            head = ["row", "prediction", *(f"score_{i}" for i in range(scores.shape[1]))]
            head += [f"raw_{i}" for i in range(raw.shape[1])] if raw is not None else []
            out.write(",".join(head) + "\n")
        for i, (pred, row) in enumerate(zip(res.predictions, scores, strict=True)):
            cells = [str(start + i), str(int(pred)), *(f"{v:.6g}" for v in row)]
            if raw is not None:
                cells += [f"{v:.6g}" for v in raw[i]]
            out.write(",".join(cells) + "\n")
    print(f"{len(X)} row(s) through {args.model}; patch: {', '.join(sorted(patches)) or 'none'}", file=sys.stderr)
    return 0


# --- registration ------------------------------------------------------------------------------------

def add_gateway_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `models`, `datasets`, `jobs`, `patches` and `infer` on the `fairpatch` parser."""
    common = argparse.ArgumentParser(add_help=False)
    add_connection_options(common)
    for add in (_add_models, _add_datasets, _add_jobs, _add_patches, _add_infer, _add_report):
        add(sub, common)


def _add_report(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    report = sub.add_parser("report", help="a job's result as one self-contained HTML page (admin)", parents=[common])
    report.add_argument("job_id")
    report.add_argument("--out", default=None, help="where to write the page (default: report-<job>.html)")
    report.set_defaults(run=handles_errors(_report))


def _report(args: argparse.Namespace, client: Client) -> int:
    from pathlib import Path

    out = Path(args.out or f"report-{args.job_id}.html")
    client.job_report(args.job_id, out)
    print(f"wrote {out.resolve()}")
    return 0
