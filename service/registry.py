"""The model registry: which upstream endpoint serves each (model, version), kept in Redis.

A registered model version names its upstream (URL, protocol, the upstream's own model name,
input and output tensors, output kind) and the name of the extra input tensor that carries the
group at inference. Reads on the hot path go through `ModelCache`, never to Redis per request.
"""

from __future__ import annotations

import time
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from redis.asyncio import Redis
from redis.exceptions import WatchError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
STORED = {"stored": True}  # validation context for specs read back from Redis


class UpstreamSpec(BaseModel):
    url: str = Field(pattern=r"^https?://[^/?#\s]+", max_length=2048,
                     description="base URL of the model server, e.g. http://triton:8000")
    protocol: Literal["v2", "v1", "mlflow"] = "v2"
    model_name: str | None = Field(None, description="the upstream's name for the model (default: the registered name)")
    model_version: str | None = Field(None, description="the upstream's version, if it wants one in the path")
    input_name: str | None = Field(None, description="input tensor name (default: the request's own)")
    output_name: str | None = Field(None, description="output tensor holding the scores (default: the first)")
    output_kind: Literal["logits", "probabilities"] = "logits"
    timeout_s: float = Field(10.0, gt=0, le=300)
    binary_data: bool | Literal["auto"] = Field(
        "auto", description="v2 only: send tensors to the upstream, and ask for its outputs, as binary data (the "
                            "binary tensor extension: Triton, fairpatch upstream); spares both ends the JSON text of "
                            "large tensors. auto: where the upstream's GET /v2 advertises the extension (read at "
                            "registration); true is refused at registration for an upstream that does not")

    @property
    def uses_binary(self) -> bool:
        """Whether requests go as binary data: true, or auto resolved to true at registration."""
        return self.binary_data is True

    @model_validator(mode="after")
    def _binary_needs_v2(self) -> UpstreamSpec:
        if self.binary_data is True and self.protocol != "v2":
            raise ValueError(f"binary_data needs protocol v2 (the binary tensor extension is part of the Open "
                             f"Inference Protocol); protocol is {self.protocol}")
        return self

    @field_validator("url")
    @classmethod
    def _http(cls, v: str, info: ValidationInfo) -> str:
        if info.context == STORED:  # a stored registration is read as it is; calls to a bad URL are 502s
            return v.rstrip("/")
        try:
            parts = urlsplit(v)
            _ = parts.port  # raises for a port outside 0-65535
        except ValueError as e:
            raise ValueError(f"upstream url {v!r} is not a usable URL ({e})") from None
        if not parts.hostname:
            raise ValueError(f"upstream url {v!r} names no host")
        return v.rstrip("/")


class Discovery(BaseModel):
    """What registration read from the upstream (service.discovery): its extensions, the model's declared
    tensors, the output kind a probe saw, and notes in words (what could not be checked, and why)."""

    checked: bool = Field(description="whether the upstream answered (false: registered unchecked)")
    extensions: list[str] | None = Field(None, description="the V2 extensions the server's GET /v2 lists")
    declared_inputs: list[str] = Field(default_factory=list)
    declared_outputs: list[str] = Field(default_factory=list)
    output_kind_seen: Literal["logits", "probabilities", "labels"] | None = Field(
        None, description="what a probe row's scores looked like (None: not probed)")
    notes: list[str] = Field(default_factory=list)
    checked_at: float = Field(default_factory=time.time)


class ArtifactInfo(BaseModel):
    """What the gateway recorded about a model version's uploaded ONNX artifact (service.artifacts)."""

    sha256: str = Field(description="sha256 of the ONNX bytes; the worker checks the stored bytes against it")
    bytes: int
    opset: int
    input_name: str
    input_shape: list[int | str] = Field(description="symbolic dimensions as strings, e.g. ['N', 104]")
    input_datatype: str
    output_name: str
    output_shape: list[int | str]
    upstream_checked: bool = Field(False, description="whether the input shape was checked against the upstream's "
                                                      "V2 metadata at upload (false: the upstream did not answer)")
    uploaded_at: float = Field(default_factory=time.time)


class ModelSpec(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field("1", pattern=NAME_PATTERN)
    upstream: UpstreamSpec
    group_input: str = Field("group", description="extra input tensor carrying the group; stripped upstream")
    groups: list[str] | None = Field(None, description="known group names (optional, for validation)")
    created_at: float = Field(default_factory=time.time)
    artifact: ArtifactInfo | None = Field(None, description="the uploaded ONNX artifact (set by POST .../artifact "
                                                            "only; ignored at registration)")
    discovery: Discovery | None = Field(None, description="what the gateway read from the upstream at registration "
                                                          "(set by the gateway; ignored at registration)")


class ModelRegistry:
    """Model versions in Redis: one JSON value per version plus an index set."""

    def __init__(self, redis: Redis, prefix: str = "fp:") -> None:
        self.redis = redis
        self.prefix = prefix

    def _key(self, name: str, version: str) -> str:
        return f"{self.prefix}model:{name}:{version}"

    async def put(self, spec: ModelSpec) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(spec.name, spec.version), spec.model_dump_json())
            pipe.sadd(f"{self.prefix}models", f"{spec.name}\x00{spec.version}")
            await pipe.execute()

    async def get(self, name: str, version: str) -> ModelSpec | None:
        raw = await self.redis.get(self._key(name, version))
        return None if raw is None else ModelSpec.model_validate_json(raw, context=STORED)

    async def versions(self, name: str) -> list[str]:
        members = await self.redis.smembers(f"{self.prefix}models")
        found = [m.decode() if isinstance(m, bytes) else m for m in members]
        return sorted((v for n, v in (m.split("\x00", 1) for m in found) if n == name), key=_version_key)

    async def latest(self, name: str) -> ModelSpec | None:
        versions = await self.versions(name)
        return await self.get(name, versions[-1]) if versions else None

    async def list(self) -> list[ModelSpec]:
        members = await self.redis.smembers(f"{self.prefix}models")
        keys = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not keys:
            return []
        raws = await self.redis.mget([self._key(*k.split("\x00", 1)) for k in keys])
        return [ModelSpec.model_validate_json(r, context=STORED) for r in raws if r is not None]

    async def delete(self, name: str, version: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(name, version))
            pipe.srem(f"{self.prefix}models", f"{name}\x00{version}")
            pipe.delete(self.artifact_key(name, version))  # the version's ONNX artifact goes with it
            deleted, _, _ = await pipe.execute()
        return bool(deleted)

    def artifact_key(self, name: str, version: str) -> str:
        return f"{self.prefix}artifact:{name}:{version}"

    async def set_artifact(self, name: str, version: str, info: ArtifactInfo | None,
                           data: bytes | None = None) -> ModelSpec | None:
        """Store (or, with None, drop) a version's artifact bytes and record `info` in its spec, in one
        transaction; None when the version is not registered."""
        key = self._key(name, version)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        await pipe.unwatch()
                        return None
                    spec = ModelSpec.model_validate_json(raw, context=STORED).model_copy(update={"artifact": info})
                    pipe.multi()
                    pipe.set(key, spec.model_dump_json())
                    if info is None:
                        pipe.delete(self.artifact_key(name, version))
                    else:
                        pipe.set(self.artifact_key(name, version), data)
                    await pipe.execute()
                    return spec
                except WatchError:  # the spec changed meanwhile: read it again
                    continue

    async def artifact_bytes(self, name: str, version: str) -> bytes | None:
        return await self.redis.get(self.artifact_key(name, version))


def _version_key(v: str) -> tuple:
    """Numeric versions sort numerically ("10" after "9"), others lexically after them."""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)
