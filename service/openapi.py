"""The OpenAPI document for routes FastAPI does not describe by itself.

Routes that parse their own bodies (the management API, checking the admin key first) and the
inference endpoint (service.fast_path, an ASGI app outside FastAPI's routing) still belong in the
document that /docs renders and that clients, code generators and fuzzers read: `document` adds
their operations and every model they reference, so each `$ref` in the document resolves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model` (list `model` in `document`'s schemas)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref(model)}}}}


@dataclass(frozen=True)
class Operation:
    """One operation the app serves outside FastAPI's routing, described for the document."""

    method: str
    path: str
    summary: str
    request: type[BaseModel]
    response: type[BaseModel]
    errors: dict[int, type[BaseModel]]
    tags: list[str] = field(default_factory=list)
    # Other request content types and their schemas (the binary tensor extension's octet stream).
    other_content: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str | None = None

    def spec(self) -> dict[str, Any]:
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "title": n}}
                  for n in re.findall(r"{(\w+)}", self.path)]
        content = {"application/json": {"schema": ref(self.request)}, **self.other_content}
        responses: dict[str, Any] = {"200": {"description": "Successful Response",
                                             "content": {"application/json": {"schema": ref(self.response)}}}}
        for code, model in sorted(self.errors.items()):
            responses[str(code)] = {"description": _REASONS.get(code, "Error"),
                                    "content": {"application/json": {"schema": ref(model)}}}
        op: dict[str, Any] = {"tags": self.tags, "summary": self.summary, "parameters": params,
                              "requestBody": {"required": True, "content": content}, "responses": responses,
                              "operationId": re.sub(r"\W+", "_", f"{self.method}_{self.path}").strip("_").lower()}
        if self.description:
            op["description"] = self.description
        return op


_REASONS = {400: "Bad Request", 404: "Not Found", 409: "Conflict", 413: "Payload Too Large",
            415: "Unsupported Media Type", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def document(app: FastAPI, *, schemas: Sequence[type[BaseModel]] = (),
             operations: Sequence[Operation] = ()) -> None:
    """Add `operations` and the models in `schemas` (and every model they reference) to the app's OpenAPI
    document. May be called more than once."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        models = [*schemas, *(m for op in operations for m in (op.request, op.response, *op.errors.values()))]
        for model in models:
            js = model.model_json_schema(ref_template=REF)
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components.setdefault(model.__name__, js)
        paths = schema.setdefault("paths", {})
        for op in operations:
            paths.setdefault(op.path, {})[op.method.lower()] = op.spec()
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def include_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """`document` with models only."""
    document(app, schemas=models)
