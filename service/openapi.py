"""Document request bodies that routes parse themselves.

Hot-path routes read the raw body and validate it with pydantic's Rust JSON parser in one pass
(about twice as fast as FastAPI's json.loads + validate for large tensors), so FastAPI does not see
their body models. This puts those models back into the OpenAPI document that /docs renders.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model` (pair it with `include_schemas`)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}}


def include_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add `models` (and the models they reference) to the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            js = model.model_json_schema(ref_template=REF)
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components.setdefault(model.__name__, js)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
