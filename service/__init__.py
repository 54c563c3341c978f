"""The gateway: FastAPI app, upstream adapters, patch store, jobs. Thin over `patcher`."""
