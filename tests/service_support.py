"""Helpers shared by the tests/test_service*.py modules (imported by name: tests/ is on sys.path)."""
from __future__ import annotations

import functools
import io

from PIL import Image

from models.samples import sample_photos
from models.store import StoredModel
from service.batch_metrics import read_batch_sizes


@functools.lru_cache(maxsize=None)
def builtin_model() -> StoredModel:
    """The built-in ImageNet model in this session's BentoML home (exported once, ~15 s)."""
    from training.builtin import ensure_builtin_model

    return ensure_builtin_model()


def photo(name: str) -> bytes:
    """A real sample photo by file name (coffee.png, chelsea.png, rocket.jpg, ...)."""
    return next(p for p in sample_photos() if p.name == name).read_bytes()


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def inference_batches(metrics_text: str) -> tuple[int, int]:
    """(onnxruntime calls, of which single-image ones), from the service's Prometheus histogram."""
    sizes = read_batch_sizes(metrics_text)
    return int(sizes.get("count", 0)), int(sizes.get("le_1.0", 0))
