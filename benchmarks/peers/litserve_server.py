"""Peer 'litserve': the built-in model behind LitServe, written the way LitServe's docs and examples do it.

    PEERS_MODEL_SPEC=spec.json benchmarks/peers/.venv/bin/python benchmarks/peers/litserve_server.py --port 8000
    curl -F image=@photo.jpg http://127.0.0.1:8000/classify

How LitServe recommends it (LitServe 0.2.x):
- LitAPI with setup / decode_request / predict / encode_response, batching configured on the LitAPI
  (`max_batch_size`, `batch_timeout`; "deprecated and moved to LitAPI" on LitServer):
  https://lightning.ai/docs/litserve/api-reference/litapi, https://lightning.ai/docs/litserve/features/batching,
  https://lightning.ai/docs/litserve/api-reference/litserver
- batch_timeout=0.01 s: the value LitServe's examples use with max_batch_size 4-16
  (e.g. Lightning-AI/LitServe tests/e2e/default_batching.py uses 0.05 with batch 4; image-classifier
  examples 0.01).
- LitServer(accelerator="cpu" | "auto", workers_per_device=...): LitServer's docstring: "For CPU, set to the
  number of cores available on the machine"; on a GPU "Good starting point: 1-4", we take 4 (the images are
  decoded in the inference workers, so they need CPU processes).
- Form uploads arrive as starlette's form (LitServe reads multipart with `request.form()`), the file under
  its field name: the request is multipart with the image in field `image`, as tuneserve's /classify takes it.
- The default LitAPI.batch stacks numpy arrays; LitAPI.unbatch splits the output per request.
Preprocessing: peer_common.straightforward_pixels (PIL open, RGB, resize shorter side bicubic, centre crop),
as the frameworks' image-classification examples write it; the graph normalises uint8 pixels itself.
"""
from __future__ import annotations

import argparse
import os

import litserve as ls
import numpy as np

import peer_common


class ImageClassifierAPI(ls.LitAPI):
    def setup(self, device):
        spec = peer_common.load_spec()
        self.labels, self.pp = spec["labels"], spec["preprocessing"]
        self.session = peer_common.session(spec["onnx"], peer_common.device())
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request):
        data = request["image"].file.read()
        return peer_common.straightforward_pixels(peer_common.open_image(data), self.pp)

    def predict(self, x):
        return self.session.run(None, {self.input_name: x})[0]

    def encode_response(self, output):
        return peer_common.top_k(output, self.labels)


def main(api_cls=ImageClassifierAPI) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    device = peer_common.device()
    api = api_cls(max_batch_size=peer_common.max_batch_size(device), batch_timeout=0.01, api_path="/classify")
    server = ls.LitServer(api, accelerator="auto" if device == "cuda" else "cpu",
                          workers_per_device=peer_common.workers(4 if device == "cuda" else os.cpu_count() or 1))
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
