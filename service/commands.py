"""The service's CLI subcommands: `fairpatch serve` (the gateway), `fairpatch worker` (runs patch-training
jobs) and `fairpatch upstream` (an ONNX model over V2). `clients/cli.py` registers them through
`add_service_parsers`; the runners import uvicorn, FastAPI and onnxruntime only when they run, so
`fairpatch --help` stays quick."""

from __future__ import annotations

import argparse
import logging
import sys

from service import kserve_mode


def add_service_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="run the gateway (embedded Redis unless FAIRPATCH_REDIS_URL is set)",
        description="Run the fairpatch gateway. Settings come from FAIRPATCH_* environment variables; "
                    "these flags override them.")
    serve.add_argument("--host", default=None, help="interface (default: FAIRPATCH_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: FAIRPATCH_PORT or 8080)")
    serve.add_argument("--no-worker", action="store_true",
                       help="in embedded mode, do not start a job worker beside the gateway")
    serve.add_argument("--access-log", action="store_true",
                       help="log every request (off by default: a log line per request costs the hot path; "
                            "put access logs in the load balancer or proxy in front)")
    serve.set_defaults(run=run_serve)
    kserve_mode.add_arguments(serve)

    work = sub.add_parser(
        "worker", help="run patch-training jobs (on FAIRPATCH_REDIS_URL, else the embedded Redis of `serve`)",
        description="Run a job worker: it takes patch-training jobs from the queue on FAIRPATCH_REDIS_URL, or "
                    "with none set from the embedded Redis that `fairpatch serve` runs under the same "
                    "FAIRPATCH_DATA_DIR. Stops on SIGTERM / Ctrl-C; a job it was running goes back to the queue. "
                    "Keeps running when Redis goes away (reconnecting with backoff) and takes jobs again once it "
                    "is back.")
    work.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    work.add_argument("--max-jobs", type=int, default=None,
                      help="jobs run at once (default: FAIRPATCH_WORKER_MAX_JOBS or 2)")
    work.add_argument("--wait", type=float, default=30.0, help="seconds to wait for Redis to answer (default: 30)")
    work.set_defaults(run=run_worker)

    up = sub.add_parser("upstream", help="serve an ONNX model over the Open Inference Protocol (KServe V2)",
                        description="Serve one ONNX model over the V2 REST protocol: a stand-in for a "
                                    "deployed endpoint (Triton, KServe, MLServer).")
    up.add_argument("--onnx", required=True, help="the .onnx model file")
    up.add_argument("--name", required=True, help="model name in /v2/models/{name}")
    up.add_argument("--version", default="1", help="model version (default: 1)")
    up.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    up.add_argument("--port", type=int, default=9000, help="port (default: 9000)")
    up.add_argument("--max-body-mib", type=float, default=64.0, help="body size limit (default: 64)")
    up.add_argument("--threads", type=int, default=0,
                    help="onnxruntime intra-op threads per request (default: 0, one per core)")
    up.add_argument("--spin", action="store_true",
                    help="let idle onnxruntime threads busy-wait (lower latency on a dedicated machine; burns "
                         "CPU between requests)")
    up.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                    help="where the model runs (default: FAIRPATCH_DEVICE or auto: the GPU where onnxruntime-gpu "
                         "finds one, else the CPU)")
    up.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    up.set_defaults(run=run_upstream)


def _configure_logging(level: str, secrets: list[str | None] | None = None) -> None:
    # uvicorn configures only its own loggers; this makes ours (fairpatch.*) visible beside them.
    logging.basicConfig(level=level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    from service.redact import install

    install(secrets or [])  # no password or key in any line, ours or a library's


def _secrets(settings: object) -> list[str | None]:
    key = getattr(settings, "admin_key", None)
    return [key.get_secret_value() if key is not None else None]


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    overrides = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    overrides = {**kserve_mode.settings_overrides(args), **overrides}
    try:
        kserve = kserve_mode.from_args(args)
    except ValueError as e:
        print(f"fairpatch serve: {e}", file=sys.stderr)
        return 2
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"fairpatch serve: invalid settings: {_redact(str(e))}", file=sys.stderr)
        return 2
    if settings.redis_url is None and not getattr(args, "no_worker", False):
        # Embedded mode: one machine, so the gateway runs its own worker (stopped with it). With a shared
        # Redis, workers are deployed on their own (`fairpatch worker`) and scaled apart from gateways.
        settings = settings.model_copy(update={"start_worker": True})
    _configure_logging(settings.log_level, _secrets(settings))
    if not _device_ok("serve", settings.device, torch=False):
        return 2
    # uvloop and httptools are picked when installed (uvicorn[standard]); both are on the hot path.
    app = create_app(settings)
    if kserve is not None:
        kserve.attach(app)
    uvicorn.run(app, host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=getattr(args, "access_log", False))
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.settings import Settings
    from service.worker import main

    try:
        settings = Settings(**({"worker_max_jobs": args.max_jobs} if args.max_jobs is not None else {}))
    except ValidationError as e:
        print(f"fairpatch worker: invalid settings: {_redact(str(e))}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level, _secrets(settings))
    # torch (when installed) is started only to check `cuda`: importing it costs the worker's start a second or two
    if not _device_ok("worker", settings.device, torch=None if settings.device == "cuda" else False):
        return 2
    return main(settings, burst=args.burst, wait_s=args.wait)


def _device_ok(command: str, device: str, *, torch: bool | None) -> bool:
    """Start the runtimes on the configured device now: `cuda` where it cannot run fails here, in one line."""
    from patcher.device import DeviceUnavailable, resolve

    try:
        where = resolve(device, torch=torch)
    except DeviceUnavailable as e:
        print(f"fairpatch {command}: {e}", file=sys.stderr)
        return False
    logging.getLogger("fairpatch.device").info("device %s: %s", device,
                                               ", ".join(f"{k} on {v}" for k, v in where.items()))
    return True


def _redact(text: str) -> str:
    from service.redact import redact

    return redact(text)


def run_upstream(args: argparse.Namespace) -> int:
    import uvicorn

    from service.local_upstream import OnnxModel, create_upstream_app
    from service.settings import MiB

    _configure_logging(args.log_level)
    try:
        model = OnnxModel(args.onnx, name=args.name, version=args.version, threads=args.threads, spin=args.spin,
                          device=getattr(args, "device", None))
    except Exception as e:  # missing file, not ONNX, unsupported signature: say so, no traceback
        print(f"fairpatch upstream: cannot load {args.onnx}: {e}", file=sys.stderr)
        return 2
    app = create_upstream_app(model, max_body_bytes=int(args.max_body_mib * MiB))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
