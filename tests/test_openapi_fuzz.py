"""schemathesis, a fuzzer nobody here wrote, against a real server and its own OpenAPI document: every
request it generates from the schema gets an answer the schema describes, no 5xx, and whatever the schema
forbids is refused (tests/schemathesis.toml says the two things a schema cannot: that random bytes are not
an image, and that "too large" is 413)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneserve.service.process import running_server

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_nothing(model, tmp_path):
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert exe, "schemathesis is in the dev extra: pip install -e '.[dev]'"
    # A 10 s latency bound: what is fuzzed is the schema, not overload (a busy CI machine can take over the 1 s
    # default for a 64-image batch, and a 503 counts as a server error).
    env = {"TUNESERVE_MODELS": model.tag, "TUNESERVE_MAX_IMAGE_BYTES": "200000", "TUNESERVE_MAX_LATENCY_MS": "10000"}
    with running_server(env=env) as url:
        r = subprocess.run([exe, "--config-file", str(CONFIG), "run", f"{url}/docs.json", "--checks", "all",
                            "--max-examples", "30", "--workers", "1", "--request-timeout", "20", "--no-color",
                            "--seed", "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    tail = "\n".join(line[:300] for line in r.stdout.splitlines()[-60:])
    assert r.returncode == 0, tail
    assert "No issues found" in r.stdout, tail
