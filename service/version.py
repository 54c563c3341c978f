"""The package version the servers report in their V2 server metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fairpatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
