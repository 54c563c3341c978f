"""The patch artifact: a JSON manifest plus ONNX / safetensors blobs, addressed by sha256.

A patch has up to three parts, each an ONNX graph: an input transform (trigger), an output
transform (logit correction, thresholds) and a replacement model (weight patch); named arrays
ride along as safetensors. The manifest names every blob by the sha256 of its bytes and the patch
id is the sha256 of the canonical manifest, so one hash pins everything. Bytes are a zip with
fixed timestamps: the same patch always serialises to the same bytes. Nothing is ever pickled.

Output-transform graph convention: inputs named `features` ([N, d] float, the model's input),
`log_probs` ([N, C] float, the model's log-probabilities) and, when the patch needs the group at
inference, `group` ([N] int64, index into `groups`), and for randomized decisions `uniform` ([N]
float, one U(0, 1) draw per row that the runner derives from the request id, so a replayed request
gets the same decisions); one output, the patched [N, C] log-scores whose argmax is the patched
decision.

Replacement model convention (weight patches): the same input as the upstream model, one output
`logits` [N, C] whose argmax is the patched decision (a tuned threshold is baked in). The gateway
runs it itself instead of calling the upstream.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MAX_PATCH_BYTES = 256 * 1024 * 1024
PARTS = ("input_transform", "output_transform", "replacement_model")


class PatchError(ValueError):
    """A patch that is malformed, fails verification, or is applied where it does not belong."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class Patch:
    manifest: dict[str, Any]
    blobs: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def build(cls, *, method: str, n_classes: int, groups: list[str] | None = None,
              group_at_inference: bool = False, input_transform: bytes | None = None,
              output_transform: bytes | None = None, replacement_model: bytes | None = None,
              arrays: Mapping[str, np.ndarray] | None = None, params: dict | None = None,
              model: dict | None = None, report: dict | None = None) -> Patch:
        """Assemble a patch from its parts; `model` names the model version it was made for."""
        blobs: dict[str, bytes] = {}
        manifest: dict[str, Any] = {
            "fairpatch_patch": FORMAT_VERSION, "method": method, "n_classes": n_classes,
            "groups": list(groups or []), "group_at_inference": group_at_inference,
            "model": model or {}, "params": params or {}, "report": report or {},
        }
        for part, data in zip(PARTS, (input_transform, output_transform, replacement_model), strict=True):
            if data is not None:
                blobs[sha256(data)] = data
                manifest[part] = {"format": "onnx", "blob": sha256(data)}
        if arrays:
            from safetensors.numpy import save

            data = save({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())})
            blobs[sha256(data)] = data
            manifest["arrays"] = {"format": "safetensors", "blob": sha256(data), "names": sorted(arrays)}
        patch = cls(manifest, blobs)
        patch.verify()
        return patch

    @property
    def id(self) -> str:
        return sha256(canonical_json(self.manifest))

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def groups(self) -> list[str]:
        return self.manifest.get("groups", [])

    @property
    def group_at_inference(self) -> bool:
        return bool(self.manifest.get("group_at_inference"))

    def part(self, name: str) -> bytes | None:
        ref = self.manifest.get(name)
        return None if ref is None else self.blobs[ref["blob"]]

    def arrays(self) -> dict[str, np.ndarray]:
        ref = self.manifest.get("arrays")
        if ref is None:
            return {}
        from safetensors.numpy import load

        return load(self.blobs[ref["blob"]])

    def for_model(self, name: str, version: str) -> Patch:
        """A copy bound to one model version (a new id: the binding is part of what is hashed)."""
        return Patch({**self.manifest, "model": {"name": name, "version": version}}, dict(self.blobs))

    def check_model(self, name: str, version: str) -> None:
        bound = self.manifest.get("model") or {}
        if bound and (bound.get("name"), str(bound.get("version"))) != (name, str(version)):
            raise PatchError(f"patch {self.id[:12]} was made for model {bound.get('name')} version "
                             f"{bound.get('version')}, not {name} version {version}")

    def verify(self) -> None:
        """Every referenced blob is present and hashes to its name; nothing else rides along."""
        m = self.manifest
        if m.get("fairpatch_patch") != FORMAT_VERSION:
            raise PatchError(f"unsupported patch format {m.get('fairpatch_patch')!r} (expected {FORMAT_VERSION})")
        refs = {m[p]["blob"] for p in (*PARTS, "arrays") if m.get(p)}
        if not refs and m.get("method") != "identity":
            raise PatchError("patch has no parts")
        if set(self.blobs) != refs:
            raise PatchError(f"patch blobs {sorted(self.blobs)} do not match the manifest's {sorted(refs)}")
        for name, data in self.blobs.items():
            if sha256(data) != name:
                raise PatchError(f"blob {name[:12]} does not match its hash: the patch is corrupted")

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in [("manifest.json", canonical_json(self.manifest)),
                               *((f"blobs/{k}", self.blobs[k]) for k in sorted(self.blobs))]:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, expected_id: str | None = None) -> Patch:
        """Parse and verify; `expected_id` (the address it was fetched by) must match the content."""
        if len(data) > MAX_PATCH_BYTES:
            raise PatchError(f"patch is {len(data)} bytes, over the {MAX_PATCH_BYTES} limit")
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                infos = zf.infolist()
                if sum(i.file_size for i in infos) > MAX_PATCH_BYTES:
                    raise PatchError("patch unpacks to more than the size limit")
                names = {i.filename for i in infos}
                if "manifest.json" not in names:
                    raise PatchError("patch has no manifest.json")
                manifest = json.loads(zf.read("manifest.json"))
                blobs = {}
                for n in names - {"manifest.json"}:
                    if not n.startswith("blobs/") or "/" in n[6:] or not n[6:]:
                        raise PatchError(f"unexpected entry {n!r} in patch")
                    blobs[n[6:]] = zf.read(n)
        except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PatchError(f"not a fairpatch patch: {e}") from e
        if not isinstance(manifest, dict):
            raise PatchError("patch manifest is not a JSON object")
        patch = cls(manifest, blobs)
        patch.verify()
        if expected_id is not None and patch.id != expected_id:
            raise PatchError(f"patch content hashes to {patch.id[:12]}, not the expected {expected_id[:12]}")
        return patch

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path, expected_id: str | None = None) -> Patch:
        return cls.from_bytes(Path(path).read_bytes(), expected_id)
