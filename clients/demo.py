"""`fairpatch demo` (what `make demo` runs): patch a biased model that is already deployed, through the
gateway, with nothing but queries.

Everything runs on this machine with embedded defaults and loopback ports:

1. the biased Adult reference model (trained once, then cached) is served over the Open Inference
   Protocol by `fairpatch upstream`'s app: this is "the deployed model";
2. the fairpatch gateway starts in front of it (embedded Redis under a temporary directory) with a
   job worker, and the demo talks to it only through the SDK (`clients.sdk.Client`), as a user would;
3. register the model, upload the Adult tune split (feature columns + income + sex), run an Eraser
   job with a query budget (progress bar), and activate the patch it produced;
4. send the Adult *test* split (rows no step above has seen) through `/v2/models/adult/infer` and
   compare the model's own decisions (the `fairpatch_raw` output) with the patched ones, per group.

Heavy imports (torch for a first training, the service) happen inside `run`, so importing the CLI
stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "adult"
BATCH = 1024  # test rows per inference request


def _worker(app: Any) -> str:
    """The gateway starts one `fairpatch worker` subprocess on its embedded Redis (`start_worker`)."""
    proc = getattr(app.state, "worker_process", None)
    if proc is None:
        raise RuntimeError("the gateway did not start a job worker (Settings.start_worker)")
    return f"`fairpatch worker` subprocess (pid {proc.pid}), started and stopped by the gateway"


def _test_predictions(client: Any, X: Any, group_names: list[str] | None, progress: Any) -> tuple[Any, Any, set]:
    """(raw decisions, patched decisions, patch ids seen) for every test row, in batches."""
    import numpy as np

    raw, patched, seen = [], [], set()
    task = progress.add_task("test split through the gateway", total=len(X), queries="", stage="")
    for start in range(0, len(X), BATCH):
        stop = start + BATCH
        out = client.infer(MODEL, X[start:stop], None if group_names is None else group_names[start:stop],
                           raw=True)
        if out.raw is None:
            raise RuntimeError("the gateway did not return the fairpatch_raw output")
        raw.append(out.raw.argmax(axis=1))
        patched.append(out.predictions)
        seen.add(out.patch_id)
        progress.update(task, completed=min(stop, len(X)))
    return np.concatenate(raw), np.concatenate(patched), seen


def _table(console: Any, y: Any, before: Any, after: Any, groups: Any, group_names: list[str], title: str) -> None:
    from rich.table import Table

    from patcher.metrics import fairness_report

    names = [group_names[g] for g in groups]
    reports = [fairness_report(y, p, names) for p in (before, after)]
    table = Table(title=title)
    for col in ("metric", "before (model)", "after (patched)", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")

    def row(label: str, b: float, a: float) -> None:
        table.add_row(label, f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f}")

    for key in ("accuracy", "balanced_accuracy", "dp_diff", "eo_diff"):
        row(key, reports[0].summary[key], reports[1].summary[key])
    for g in group_names:
        row(f"selection rate ({g})", reports[0].by_group[g]["selection_rate"], reports[1].by_group[g]["selection_rate"])
    for g in group_names:
        row(f"accuracy ({g})", reports[0].by_group[g]["accuracy"], reports[1].by_group[g]["accuracy"])
    console.print(table)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from clients.sdk import Client, FairpatchError, Job, ModelSpec, UpstreamSpec
    from patcher.datasets import load_dataset
    from patcher.reference_models import reference_model
    from service.app import create_app
    from service.local_upstream import OnnxModel, create_upstream_app
    from service.serve_thread import ServerThread
    from service.settings import Settings

    # The demo prints its own story: the servers (and the worker subprocess, through the environment it
    # inherits) log warnings and errors only.
    os.environ.setdefault("FAIRPATCH_LOG_LEVEL", "warning")
    logging.getLogger("fairpatch").setLevel(logging.ERROR)
    console = Console()
    bias = getattr(args, "bias", "estimator")
    console.print(f"[bold]fairpatch demo[/]: patch a deployed, biased Adult model through the gateway "
                  f"({args.queries} queries, Eraser, bias={bias}, seed {args.seed})")
    started = time.perf_counter()
    data = load_dataset("adult", "sex")
    group_names = list(data.group_names)
    with console.status("loading the biased Adult reference model (trained once, then cached)"):
        model = reference_model("adult", "sex", seed=args.seed, data=data)

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fairpatch-demo-")))
        onnx_path = model.save(tmp / "adult.onnx")
        upstream = stack.enter_context(ServerThread(create_upstream_app(OnnxModel(onnx_path, name=MODEL))))
        admin_key = secrets.token_urlsafe(16)
        settings = Settings(data_dir=tmp / "data", redis_url=None, admin_key=admin_key, log_level="warning",
                            upstream_allowlist=[], start_worker=True)
        app = create_app(settings)
        gateway = stack.enter_context(ServerThread(app))
        worker = _worker(app)
        console.print(f"  deployed model (OIP V2)  {upstream.url}/v2/models/{MODEL}\n"
                      f"  fairpatch gateway        {gateway.url}   (embedded Redis in {tmp / 'data'})\n"
                      f"  job worker               {worker}")
        client = stack.enter_context(Client(gateway.url, admin_key, timeout=120))

        try:
            client.register_model(ModelSpec(
                name=MODEL, version="1", groups=group_names, group_input="group",
                upstream=UpstreamSpec(url=upstream.url, model_name=MODEL, input_name="input", output_name="logits",
                                      output_kind="logits")))
            tune = pd.DataFrame(data.tune.X, columns=data.feature_names)
            tune["income"] = data.tune.y
            tune["sex"] = [group_names[g] for g in data.tune.groups]
            ds = client.upload_dataset(tune, label="income", group="sex", name="adult-tune")
            console.print(f"1. registered model '{MODEL}' v1; uploaded the tune split: dataset {ds.id} "
                          f"({ds.rows} rows, {len(ds.columns)} columns, groups {', '.join(ds.groups)})")

            job = client.create_job(MODEL, ds.id, version="1", method="eraser", criterion="dp",
                                    query_budget=args.queries, seed=args.seed, options={"bias": bias})
            columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                       TextColumn("{task.fields[queries]}"), TextColumn("[dim]{task.fields[stage]}"),
                       TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(f"2. Eraser job {job.id[:8]}", total=1.0, queries="0 queries",
                                         stage="queued")

                def show(j: Job) -> None:
                    done = 1.0 if j.status == "succeeded" else j.progress.fraction
                    progress.update(task, completed=done, queries=f"{j.progress.queries_used} queries",
                                    stage=j.progress.stage or j.status)

                job = client.wait_job(job.id, progress=show, timeout=600)
            if job.status != "succeeded" or job.result is None or not job.result.patch_id:
                console.print(f"[red]the job {job.status}[/]: {job.error or 'no patch'}")
                return 1
            result = job.result
            console.print(f"   patch {result.patch_id[:16]} from {result.queries_used} of {args.queries} queries "
                          f"(+{result.eval_queries} to score it on the held-out rows); held-out dp_diff "
                          f"{result.before.get('dp_diff', float('nan')):.3f} -> "
                          f"{result.after.get('dp_diff', float('nan')):.3f}")

            client.activate_patch(MODEL, result.patch_id, version="1")
            listing = client.list_patches(MODEL, "1")
            needs_group = next((bool(p.group_at_inference) for p in listing.patches if p.id == result.patch_id),
                               bool(result.group_at_inference))
            console.print(f"3. activated it (active: {(listing.active or 'none')[:16]}); the group is "
                          f"{'sent with every row' if needs_group else 'not needed at inference'}")

            test = data.test
            names = np.asarray([group_names[g] for g in test.groups]) if needs_group else None
            with Progress(TextColumn("4. {task.description}"), BarColumn(), TaskProgressColumn(),
                          TimeElapsedColumn(), console=console) as progress:
                before, after, seen = _test_predictions(client, test.X, names, progress)
        except FairpatchError as e:
            console.print(f"[red]the gateway refused a request[/]: {e.message} (HTTP {e.status})")
            return 1
        if seen != {result.patch_id}:
            console.print(f"[red]expected every answer from patch {result.patch_id[:12]}, got {seen}[/]")
            return 1
        _table(console, test.y, before, after, test.groups, group_names,
               f"Adult test split ({len(test.y):,} rows never seen by the job) through {gateway.url}")
        console.print("Same deployed model, same rows: 'before' is the model's own answer (fairpatch_raw), "
                      "'after' what the gateway served with the patch active.")
        console.print(f"[dim]shutting down (the demo took {time.perf_counter() - started:.1f}s)[/]")
    return 0


def main() -> None:  # `python -m clients.demo`
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bias", default="estimator", choices=["estimator", "group"])
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
