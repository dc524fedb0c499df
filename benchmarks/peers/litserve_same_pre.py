"""Peer 'litserve-same-pre': LitServe as in litserve_server.py, given tuneserve's own shortcuts.

    PEERS_MODEL_SPEC=spec.json PYTHONPATH=/path/to/repo \\
        benchmarks/peers/.venv/bin/python benchmarks/peers/litserve_same_pre.py --port 8000

Same server, batching and workers as litserve_server.py; two things change, both what tuneserve does:
- preprocessing is tuneserve.models.preprocessing.preprocess_pixels with the model card's Preprocessing
  (JPEG draft decoding of large photos, resampling only the columns the centre crop keeps, EXIF orientation),
  imported from the source tree through PYTHONPATH (it needs only PIL and numpy);
- onnxruntime on CPU gets tuneserve's thread settings: the cores split among the workers
  (service/config.py onnxruntime_threads) and idle intra-op threads sleeping instead of spinning
  ("session.intra_op.allow_spinning" = "0"), which leaves the cores to decoding.
So what remains between this peer and tuneserve is the serving machinery itself.
"""
from __future__ import annotations

import os

from tuneserve.models.preprocessing import Preprocessing, preprocess_pixels

import litserve_server
import peer_common


class SameShortcutsAPI(litserve_server.ImageClassifierAPI):
    def setup(self, device):
        spec = peer_common.load_spec()
        self.labels, self.pp = spec["labels"], Preprocessing.from_dict(spec["preprocessing"])
        dev = peer_common.device()
        threads = max(1, (os.cpu_count() or 1) // peer_common.workers(os.cpu_count() or 1))
        self.session = peer_common.session(spec["onnx"], dev, tuneserve_threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request):
        return preprocess_pixels(request["image"].file.read(), self.pp)


if __name__ == "__main__":
    litserve_server.main(SameShortcutsAPI)
