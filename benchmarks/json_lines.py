"""The benchmarks' ``--json FILE``: one JSON record appended per line, so runs of several commands collect in one
file (the rows of benchmarks/RESULTS.md are read from these)."""

from __future__ import annotations

import json
from typing import Any


def append_json_line(path: str | None, record: dict[str, Any]) -> None:
    """Append ``record`` to ``path`` as one line; nothing when no file was asked for."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
