"""`fairpatch upstream`: any ONNX model served over the Open Inference Protocol (V2) REST API.

It plays the deployed model the gateway fronts in the demo, tests and benchmarks, and speaks the
same protocol as Triton, KServe or Seldon MLServer would, binary tensor data included (requests and,
when asked, answers: service.binary_tensors). One InferenceSession is created at start
and shared (onnxruntime's `run` is thread-safe); inference runs in the thread pool so a large batch
never blocks the event loop. Every bad request gets a 4xx `{"error": ...}` (see service.errors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from service import binary_tensors
from service.body_limit import BodySizeLimit
from service.errors import ApiError, install_error_handlers
from service.oip import (
    ErrorResponse,
    InferRequest,
    InferResponse,
    InvalidRequest,
    LiveResponse,
    MetadataTensor,
    ModelMetadata,
    ModelReadyResponse,
    ReadyResponse,
    ServerMetadata,
    check_signature,
    datatype_of,
    from_numpy,
    to_numpy,
)
from service.openapi import include_schemas, json_body
from service.settings import MiB
from service.version import __version__

SERVER_NAME = "fairpatch-upstream"
PLATFORM = "onnxruntime_onnx"  # the platform name Triton reports for ONNX Runtime models

# onnxruntime type strings -> OIP datatypes
ORT_DATATYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _metadata_tensor(arg) -> MetadataTensor | None:
    datatype = ORT_DATATYPES.get(arg.type)
    if datatype is None:
        return None
    # Symbolic ("N") and unknown (None) dimensions are both "any size" in the protocol.
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
    return MetadataTensor(name=arg.name, datatype=datatype, shape=shape)


class OnnxModel:
    """One ONNX model behind one onnxruntime session, with its V2 metadata read from the graph."""

    def __init__(self, model: str | Path | bytes, name: str, version: str = "1", *, threads: int = 0,
                 spin: bool = False, device: str | None = None) -> None:
        import onnxruntime as ort

        from patcher.device import ort_session, session_device

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
        # Spinning keeps idle intra-op threads busy-waiting for the next operator: it saves microseconds on a
        # dedicated machine and, between requests, burns the cores that the server's other work (and anything
        # sharing the machine, such as a gateway in front of it) needs. Off unless asked for.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # device (patcher.device): None = FAIRPATCH_DEVICE, else auto (the GPU where onnxruntime-gpu finds one)
        self.session = ort_session(model if isinstance(model, bytes) else str(model), opts, device)
        self.device = session_device(self.session)
        self.name, self.version = name, version
        inputs = [(a, _metadata_tensor(a)) for a in self.session.get_inputs()]
        unsupported = [f"{a.name} ({a.type})" for a, t in inputs if t is None]
        if unsupported:
            raise ValueError(f"model inputs not expressible in the V2 protocol: {', '.join(unsupported)}")
        # Non-tensor outputs (e.g. sklearn's seq(map) probabilities) are left out of the served surface.
        outputs = [t for t in map(_metadata_tensor, self.session.get_outputs()) if t is not None]
        if not outputs:
            raise ValueError("the model has no tensor outputs to serve")
        self.metadata = ModelMetadata(name=name, versions=[version], platform=PLATFORM,
                                      inputs=[t for _, t in inputs], outputs=outputs)
        self.output_names = [t.name for t in outputs]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        try:
            return self.session.run(outputs, feeds)
        except Exception as e:  # imported here: the happy path pays for no import per call
            from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

            if isinstance(e, InvalidArgument):  # what slipped past the signature check is still the client's input
                raise InvalidRequest(f"the model rejected the input: {e}") from None
            raise


def _router(model: OnnxModel) -> APIRouter:
    router = APIRouter(prefix="/v2", responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})

    def resolve(model_name: str, model_version: str | None) -> str:
        if model_name != model.name:
            raise ApiError(404, f"unknown model '{model_name}'; this server serves '{model.name}'")
        if model_version is not None and model_version != model.version:
            raise ApiError(404, f"model '{model_name}' has no version '{model_version}' "
                                f"(versions: {model.version})")
        return model.version

    @router.get("", response_model=ServerMetadata)
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=[binary_tensors.EXTENSION])

    @router.get("/health/live", response_model=LiveResponse)
    async def live() -> LiveResponse:
        return LiveResponse(live=True)

    @router.get("/health/ready", response_model=ReadyResponse)
    async def ready() -> ReadyResponse:
        return ReadyResponse(ready=True)  # the session is loaded before the server accepts requests

    @router.get("/models/{model_name}", response_model=ModelMetadata, response_model_exclude_none=True)
    @router.get("/models/{model_name}/versions/{model_version}", response_model=ModelMetadata,
                response_model_exclude_none=True)
    async def model_metadata(model_name: str, model_version: str | None = None) -> ModelMetadata:
        resolve(model_name, model_version)
        return model.metadata

    @router.get("/models/{model_name}/ready", response_model=ModelReadyResponse)
    @router.get("/models/{model_name}/versions/{model_version}/ready", response_model=ModelReadyResponse)
    async def model_ready(model_name: str, model_version: str | None = None) -> ModelReadyResponse:
        resolve(model_name, model_version)
        return ModelReadyResponse(name=model_name, ready=True)

    infer_doc = {"response_model": InferResponse, "openapi_extra": json_body(InferRequest),
                 "responses": {413: {"model": ErrorResponse}}}

    @router.post("/models/{model_name}/infer", **infer_doc)
    @router.post("/models/{model_name}/versions/{model_version}/infer", **infer_doc)
    async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
        version = resolve(model_name, model_version)
        req = binary_tensors.parse_request(await request.body(), request.headers.get(binary_tensors.HEADER))
        check_signature(model.metadata, req)
        feeds = {t.name: to_numpy(t) for t in req.inputs}
        names = [o.name for o in req.outputs] if req.outputs else model.output_names
        results = await run_in_threadpool(model.run, feeds, names)
        asked = {o.name: o.parameters for o in req.outputs or ()}
        binary = [binary_tensors.wants_binary(asked.get(n), req.parameters) for n in names]
        if any(binary):  # the binary tensor extension, as Triton answers it
            body, n = binary_tensors.encode_response(
                {"model_name": model.name, "model_version": version, "id": req.id},
                [(name, r, datatype_of(r.dtype), list(r.shape), None) for name, r in zip(names, results, strict=True)],
                binary)
            return Response(body, media_type=binary_tensors.CONTENT_TYPE, headers={binary_tensors.HEADER: str(n)})
        response = InferResponse(model_name=model.name, model_version=version, id=req.id,
                                 outputs=[from_numpy(n, r) for n, r in zip(names, results, strict=True)])
        # Serialized by pydantic-core directly: FastAPI's jsonable_encoder is slow on long lists.
        return Response(response.model_dump_json(exclude_none=True), media_type="application/json")

    return router


def create_upstream_app(model: OnnxModel, *, max_body_bytes: int = 64 * MiB) -> FastAPI:
    app = FastAPI(title=f"fairpatch upstream: {model.name}", version=__version__,
                  description="An ONNX model served over the Open Inference Protocol (KServe V2) REST API.")
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.include_router(_router(model))
    include_schemas(app, InferRequest)
    return app
