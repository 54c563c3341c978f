"""The science of fairpatch: metrics, datasets, oracles, patches, methods. No HTTP, no Redis."""
