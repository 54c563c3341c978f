"""A KServe Python model server as a user writes one: a `kserve.Model` over the scikit-learn model in
MODEL_DIR/model.joblib, served by `kserve.ModelServer` over V1 (`/v1/models/NAME:predict`, answering
`predict_proba` rows) and V2 (`/v2/models/NAME/infer`, one FP32 output `probabilities`). Run by
tests/peer_servers.py with the kserve virtualenv's interpreter (tests/peer_envs.py).

Two adaptations, both KServe's: V2 answers need `response_id` as a str (the request id may be None), and
the REST server binds 0.0.0.0 whatever it is told, so the test rebinds it to loopback."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import joblib
import kserve
import numpy as np
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse


class LoopbackConfig(uvicorn.Config):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["host"] = "127.0.0.1"  # KServe hard-codes 0.0.0.0 (kserve/protocol/rest/server.py)
        super().__init__(*args, **kwargs)


class SklearnProba(kserve.Model):
    def __init__(self, name: str, model_dir: str) -> None:
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.clf = None
        self.load()

    def load(self) -> bool:
        # joblib is the peer server's own model format, as a KServe user ships it: this file is written by
        # train.py in the same test run, inside the peer's venv; no patch or upload ever reaches this loader
        self.clf = joblib.load(self.model_dir / "model.joblib")
        self.ready = True
        return self.ready

    async def predict(self, payload, headers=None, response_headers=None):
        if isinstance(payload, InferRequest):
            X = payload.inputs[0].as_numpy().astype(np.float32)
            p = self.clf.predict_proba(X).astype(np.float32)
            binary = payload.use_binary_outputs
            out = InferOutput(name="probabilities", shape=list(p.shape), datatype="FP32")
            out.set_data_from_numpy(p, binary_data=binary)
            return InferResponse(response_id=str(payload.id or uuid.uuid4()), model_name=self.name,
                                 infer_outputs=[out], use_binary_outputs=binary)
        X = np.asarray(payload["instances"], dtype=np.float32)
        return {"predictions": self.clf.predict_proba(X).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name", default="adult")
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--http_port", type=int, required=True)
    parser.add_argument("--grpc_port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args, _ = parser.parse_known_args()
    import kserve.protocol.rest.server as rest_server

    rest_server.uvicorn.Config = LoopbackConfig
    model = SklearnProba(args.model_name, args.model_dir)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                       enable_grpc=False).start([model])


if __name__ == "__main__":
    main()
