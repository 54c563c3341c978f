"""KServe's Python transformer with identity pre- and post-processing: the peer a user writes by hand to put
Python in front of a model server. Run with the kserve virtualenv's interpreter (tests/peer_envs.py):

    python benchmarks/kserve_transformer.py --model_name adult --predictor_host 127.0.0.1:9000 \
        --predictor_protocol v2 --http_port 9200

A `kserve.Model` whose preprocess and postprocess return what they get; its predict is KServe's own, which
sends the request to the predictor host through KServe's REST client (V2 here) and returns the answer.
`kserve.ModelServer` reads the rest of its settings from the command line (KServe's own flags):
`benchmarks/gateway_overhead.py` turns its per-request log lines off (`--enable_latency_logging false`,
`--configure_logging false`), as the gateway runs without an access log, and its gRPC server off.
KServe binds 0.0.0.0 whatever it is told; as in tests/peer_models/kserve_server.py, it is rebound to loopback.
"""

from __future__ import annotations

import kserve
import kserve.protocol.rest.server as rest_server
import uvicorn
from kserve.model_server import parser


class LoopbackConfig(uvicorn.Config):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["host"] = "127.0.0.1"  # KServe hard-codes 0.0.0.0 (kserve/protocol/rest/server.py)
        super().__init__(*args, **kwargs)


class IdentityTransformer(kserve.Model):
    """Forwards every request unchanged; the model's name is the predictor's (KServe calls the same name)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True

    async def preprocess(self, payload, headers=None):
        return payload

    async def postprocess(self, result, headers=None, response_headers=None):
        return result


def main() -> None:
    args, _ = parser.parse_known_args()
    if not args.predictor_host:
        raise SystemExit("--predictor_host is required (host:port of the model server)")
    rest_server.uvicorn.Config = LoopbackConfig
    kserve.ModelServer().start([IdentityTransformer(args.model_name)])


if __name__ == "__main__":
    main()
