"""(seam: filled in by the infer component)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

router = APIRouter()


async def startup(app: FastAPI) -> None:
    """Open what this component needs (kept on app.state)."""


async def shutdown(app: FastAPI) -> None:
    """Close what startup opened."""
