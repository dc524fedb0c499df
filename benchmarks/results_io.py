"""A benchmark's JSON result: its own fields, plus the date, the machine and the command that produced it
(docs/benchmarks.md quotes all three beside every figure)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def write_result(path: Path, **fields: Any) -> None:
    """Write `fields` as JSON to `path` (folders made as needed); a `machine` field replaces the default."""
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.node()}: {os.cpu_count()} CPUs",
              **fields, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {path}")
