"""Peer 'bentoml-gallery': the built-in model as a plain BentoML service, the way BentoML's docs and
examples write an ONNX image classifier (runs in the project venv, BentoML 1.4).

    cd benchmarks/peers
    PEERS_MODEL_SPEC=spec.json ../../.venv/bin/bentoml serve bentoml_gallery:ImageClassifier --port 8000
    curl -F image=@photo.jpg http://127.0.0.1:8000/classify

How BentoML recommends it:
- `@bentoml.service` class, onnxruntime session created in `__init__`, `@bentoml.api(batchable=True,
  max_batch_size=..., max_latency_ms=...)` on a method whose one parameter is a list (the batch):
  docs/source/get-started/adaptive-batching.rst ("Adaptive batching"; its example: batchable=True,
  max_batch_size=32, max_latency_ms=1000), and the ONNX image-classifier services built on it, e.g.
  SkafteNicki/dtu_mlops s7_deployment/exercise_files/bentoml_service_adaptive_batching.py.
- PIL images as an API input type: docs/source/build-with-bentoml/iotypes.rst (``PIL.Image.Image`` for
  image data); a multipart field per parameter, so clients send the image in field `image`, as tuneserve's
  /classify takes it. BentoML's adaptive batching concatenates the lists of concurrent requests.
- Workers: docs/source/build-with-bentoml/workers.rst: on CPU, ``workers="cpu_count"`` (the GIL: one process
  per core); on a GPU one worker per GPU (its examples' default).
- max_latency_ms=1000: the docs' example value, and tuneserve's own default bound.
Preprocessing: peer_common.straightforward_pixels, as in the LitServe peer; the graph normalises uint8 pixels.
"""
from __future__ import annotations

import os

import bentoml
import numpy as np
from PIL import Image

import peer_common

_DEVICE = peer_common.device()
_WORKERS = peer_common.workers(1) if _DEVICE == "cuda" else (int(os.environ["PEERS_WORKERS"])
                                                             if os.environ.get("PEERS_WORKERS") else "cpu_count")


@bentoml.service(workers=_WORKERS, traffic={"timeout": 60})
class ImageClassifier:
    def __init__(self) -> None:
        spec = peer_common.load_spec()
        self.labels, self.pp = spec["labels"], spec["preprocessing"]
        self.session = peer_common.session(spec["onnx"], _DEVICE)
        self.input_name = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True, max_batch_size=peer_common.max_batch_size(_DEVICE), max_latency_ms=1000)
    def classify(self, image: list[Image.Image]) -> list[dict]:
        batch = np.stack([peer_common.straightforward_pixels(img, self.pp) for img in image])
        logits = self.session.run(None, {self.input_name: batch})[0]
        return [peer_common.top_k(row, self.labels) for row in logits]
