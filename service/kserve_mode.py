"""KServe transformer mode: `fairpatch serve` as the transformer of an InferenceService.

KServe starts a transformer container with its own arguments appended to the container's: `--model_name`
(the InferenceService's name), `--predictor_host` (the predictor's service host, no scheme), `--http_port`,
and `--workers` when the component sets a container concurrency; the user adds `--protocol v2` (or
`--predictor_protocol`) when the predictor speaks the Open Inference Protocol (KServe's default is v1).
With those, the gateway registers that one model at start-up, with the predictor as its upstream, so
requests to `/v2/models/{name}/infer` (or V1 `:predict`) are patched with no registration call first.
Everything else (Redis, the admin key, workers) is as in any other deployment.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.registry import ModelRegistry, ModelSpec

log = logging.getLogger("fairpatch.kserve")

PROTOCOLS = ("v1", "v2", "grpc-v2")


def _flag(value: str) -> bool:
    """KServe's boolean arguments come as strings ("true", "False", "1")."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "on", "t"):
        return True
    if v in ("0", "false", "no", "n", "off", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments KServe passes a transformer (underscored, as KServe spells them)."""
    g = parser.add_argument_group(
        "KServe transformer", "Set by KServe when fairpatch is an InferenceService's transformer: the model named "
                              "--model_name is registered at start-up with the predictor as its upstream.")
    g.add_argument("--model_name", default=None, help="the InferenceService's name: the model served and patched")
    g.add_argument("--predictor_host", default=None, help="the predictor's host[:port] (KServe: <name>-predictor.<ns>)")
    g.add_argument("--http_port", type=int, default=None, help="port (when --port is not given)")
    g.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="the predictor's protocol (KServe's older name for --predictor_protocol)")
    g.add_argument("--predictor_protocol", choices=PROTOCOLS, default=None,
                   help="the predictor's protocol (default: v1, as in KServe)")
    g.add_argument("--predictor_use_ssl", type=_flag, default=False, help="call the predictor over https")
    g.add_argument("--predictor_request_timeout_seconds", type=float, default=None,
                   help="timeout of one predictor request (default: the registration default, 10 s)")
    g.add_argument("--workers", type=int, default=None,
                   help="accepted for KServe's container concurrency; fairpatch serves with one event loop per "
                        "pod, so scale pods (replicas) instead")
    # fairpatch's own, for predictors that do not follow KServe's naming.
    g.add_argument("--predictor_model_name", default=None,
                   help="the predictor's name for the model (default: --model_name)")
    g.add_argument("--output_kind", choices=["logits", "probabilities"], default="logits",
                   help="what the predictor's scores output holds (default: logits)")


@dataclass(frozen=True)
class KServeModel:
    """The one model a KServe transformer patches."""

    spec: ModelSpec
    workers: int | None = None

    def attach(self, app: FastAPI) -> None:
        """Register the model once the app's own start-up (Redis, registry) is done, before it serves."""
        inner = app.router.lifespan_context
        spec, workers = self.spec, self.workers

        @asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            if workers not in (None, 1):
                log.info("--workers %s: fairpatch serves with one event loop per pod; scale the transformer's "
                         "replicas instead", workers)
            async with inner(a) as state:
                await register(a.state.registry, spec)
                yield state

        app.router.lifespan_context = lifespan


def from_args(args: argparse.Namespace) -> KServeModel | None:
    """The KServe model from `fairpatch serve`'s arguments; None when not started as a transformer.
    ValueError says what is wrong with the arguments."""
    name, host = getattr(args, "model_name", None), getattr(args, "predictor_host", None)
    if name is None and host is None:
        return None
    if not name or not host:
        raise ValueError("a KServe transformer needs both --model_name and --predictor_host")
    protocol = getattr(args, "predictor_protocol", None) or getattr(args, "protocol", None) or "v1"
    if protocol == "grpc-v2":
        raise ValueError("fairpatch calls the predictor over REST: use --protocol v2 (the predictor's HTTP port), "
                         "not grpc-v2")
    from pydantic import ValidationError

    from service.registry import ModelSpec, UpstreamSpec

    url = host if host.startswith(("http://", "https://")) else \
        f"{'https' if getattr(args, 'predictor_use_ssl', False) else 'http'}://{host}"
    upstream: dict[str, Any] = {"url": url, "protocol": protocol, "output_kind": getattr(args, "output_kind", "logits"),
                                "model_name": getattr(args, "predictor_model_name", None) or name}
    if (timeout := getattr(args, "predictor_request_timeout_seconds", None)) is not None:
        upstream["timeout_s"] = timeout
    try:
        spec = ModelSpec(name=name, version="1", upstream=UpstreamSpec(**upstream))
    except ValidationError as e:
        raise ValueError(f"cannot serve {name!r} from {url}: {e.errors()[0]['msg']} "
                         f"({'.'.join(map(str, e.errors()[0]['loc']))})") from None
    return KServeModel(spec=spec, workers=getattr(args, "workers", None))


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """KServe's --http_port, as the port setting (an explicit --port wins over it)."""
    port = getattr(args, "http_port", None)
    return {} if port is None else {"port": port}


async def register(registry: ModelRegistry, spec: ModelSpec) -> ModelSpec:
    """Register `spec`, keeping what an earlier registration of the same version holds (its uploaded
    artifact, known groups): a transformer restarts, and replicas share one Redis."""
    current = await registry.get(spec.name, spec.version)
    if current is not None and current.upstream == spec.upstream:
        return current
    merged = spec if current is None else current.model_copy(update={"upstream": spec.upstream})
    await registry.put(merged)
    log.info("KServe transformer: model %r v%s -> %s (%s)", merged.name, merged.version, merged.upstream.url,
             merged.upstream.protocol)
    return merged
