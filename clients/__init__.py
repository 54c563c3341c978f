"""What users hold: the Python SDK and the `fairpatch` CLI. Installs and imports without torch."""
