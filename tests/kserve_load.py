"""Load an InferenceService manifest into the `kserve` package's V1beta1InferenceService, refusing any field
its models do not know. Run by tests/test_deploy.py with an interpreter that has kserve installed (its pins
clash with ours, so it lives in a virtualenv of its own): `python tests/kserve_load.py FILE`."""

from __future__ import annotations

import re
import sys
from typing import Any


def load(data: Any, type_name: str, path: str = "$") -> Any:
    import kserve.models as kserve_models
    import kubernetes.client.models as k8s_models

    if data is None:
        return None
    if m := re.match(r"list\[(.*)\]$", type_name):
        return [load(d, m.group(1), f"{path}[{i}]") for i, d in enumerate(data)]
    if m := re.match(r"dict\(([^,]*), (.*)\)$", type_name):
        return {k: load(v, m.group(2), f"{path}.{k}") for k, v in data.items()}
    cls = getattr(kserve_models, type_name, None) or getattr(k8s_models, type_name, None)
    if cls is None:  # str, int, bool, object, datetime
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {type_name} must be a mapping, got {type(data).__name__}")
    fields = {wire: attr for attr, wire in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{path}: {type_name} has no field {', '.join(unknown)}")
    return cls(**{fields[k]: load(v, cls.openapi_types[fields[k]], f"{path}.{k}") for k, v in data.items()})


def main(path: str) -> int:
    import yaml
    from kserve import V1beta1InferenceService

    with open(path) as f:
        doc = yaml.safe_load(f)
    try:
        isvc = load(doc, "V1beta1InferenceService")
    except (ValueError, TypeError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    assert isinstance(isvc, V1beta1InferenceService)
    print(f"{path}: a V1beta1InferenceService with a {type(isvc.spec.transformer).__name__} of "
          f"{len(isvc.spec.transformer.containers)} container(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
