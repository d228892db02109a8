"""Content hashes of settings: equal settings give equal hashes, whatever their order or spelling.

Floats with an integral value are written as ints, so ``temperature: 4`` and ``temperature: 4.0``
name the same stage; key order never matters because keys are sorted.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical(value: Any) -> Any:
    """``value`` with integral floats turned into ints and tuples into lists, recursively."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(key): canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def content_hash(value: Any) -> str:
    """Full sha256 hex digest of ``value``'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()
