"""`HttpOracle`: the deployed model, reached over its own protocol, as a counting black box.

Jobs fit patches through it: every row sent to the real endpoint is counted against the job's
query budget, rows are sent in batches, and a row already paid for is served from the cache (all
three from `CountingOracle`). The scores are the upstream's raw outputs, asked for by name; `output_kind`
comes from the model version's registration, and the first scores are checked against it
(service.discovery: hard labels, or probabilities registered as logits, fail the job with the fix).
Blocking on purpose: methods are synchronous numpy code that runs in a worker, never on the gateway's
event loop.
"""

from __future__ import annotations

import numpy as np

from patcher.oracle import CountingOracle
from service.discovery import check_scores
from service.oip import NUMPY_DTYPES
from service.registry import ModelSpec
from service.upstream import SyncUpstreamClient, UpstreamError


class HttpOracle(CountingOracle):
    def __init__(self, spec: ModelSpec, budget: int | None = None, *, client: SyncUpstreamClient | None = None,
                 batch_size: int = 1024, cache: bool = True) -> None:
        super().__init__(budget, batch_size=batch_size, cache=cache, output_kind=spec.upstream.output_kind)
        self.spec = spec
        self._client = client or SyncUpstreamClient()
        self._owns_client = client is None
        # (input tensor name, datatype, output tensor name), resolved once
        self._input: tuple[str | None, str, str | None] | None = None
        self._checked = False

    def _input_tensor(self) -> tuple[str | None, str, str | None]:
        """The tensors the rows travel in and the scores come back in: V2 upstreams say them in their metadata
        (fetched once; what it does not declare comes from the registration)."""
        if self._input is None:
            up = self.spec.upstream
            if up.protocol != "v2":
                self._input = (None, "FP32", None)
            else:
                meta = self._client.metadata(self.spec)
                named = [t for t in meta.inputs if t.name == up.input_name] if up.input_name else meta.inputs
                if len(named) != 1:
                    raise UpstreamError(f"upstream model '{meta.name}' has inputs "
                                        f"{', '.join(t.name for t in meta.inputs)}; register its feature input "
                                        "as input_name", url=up.url)
                datatype = named[0].datatype
                self._input = (named[0].name, datatype if NUMPY_DTYPES[datatype].kind == "f" else "FP32",
                               up.output_name or meta.outputs[0].name)
        return self._input

    def _score_batch(self, X: np.ndarray) -> np.ndarray:
        name, datatype, output = self._input_tensor()
        scores = self._client.scores(self.spec, X, input_name=name, datatype=datatype, output_name=output)
        if not self._checked:  # what the model answers, against what it was registered as
            check_scores(self.spec, scores)
            self._checked = True
        return scores

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> HttpOracle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
