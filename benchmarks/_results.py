"""Shared by the benchmark scripts: where their machine-readable results go."""

from __future__ import annotations

import json


def write_json(path: str | None, result: dict) -> dict:
    """Write ``result`` to ``path`` (when given) and return it."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result
