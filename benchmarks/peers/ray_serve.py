"""Peer 'ray-serve': the built-in model behind Ray Serve with `@serve.batch`, as Ray's docs write it.

    PEERS_MODEL_SPEC=spec.json benchmarks/peers/.venv/bin/python benchmarks/peers/ray_serve.py --port 8000
    curl -F image=@photo.jpg http://127.0.0.1:8000/classify

How Ray recommends it (Ray 2.x):
- A `@serve.deployment` class whose `__call__` takes starlette's Request, and an async method decorated with
  `@serve.batch(max_batch_size=..., batch_wait_timeout_s=...)` taking a list and returning a list of the same
  length: doc/source/serve/advanced-guides/dyn-req-batch.md ("Dynamic Request Batching"); its default wait
  0.01 s; "max_batch_size ideally should be a power of 2" (we use tuneserve's default bound: 8 on CPU).
- max_ongoing_requests: Ray's default (5 per replica) would cap a batch below max_batch_size and queue the
  rest at the proxy; the autoscaling guide says to set it higher ("Setting it too low can throttle
  throughput ... requests will tend to queue up at the proxy"): 2 x max_batch_size, a batch running while the
  next one fills.
- Replicas: one per CPU core, `ray_actor_options={"num_cpus": 1}` (Ray schedules replicas by CPUs); on a GPU
  PEERS_WORKERS replicas (default 4) sharing it with fractional `num_gpus`.
- The image arrives as multipart field `image` (starlette's `request.form()`), as tuneserve's /classify takes it.
Preprocessing: peer_common.straightforward_pixels, as in the LitServe and BentoML peers.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading

import numpy as np
import ray
from ray import serve
from starlette.requests import Request

import peer_common

_DEVICE = peer_common.device()
_MAX_BATCH = peer_common.max_batch_size(_DEVICE)
_REPLICAS = peer_common.workers(4 if _DEVICE == "cuda" else os.cpu_count() or 1)


@serve.deployment(
    num_replicas=_REPLICAS,
    max_ongoing_requests=2 * _MAX_BATCH,
    ray_actor_options={"num_gpus": 1 / _REPLICAS} if _DEVICE == "cuda" else {"num_cpus": 1},
)
class ImageClassifier:
    def __init__(self) -> None:
        spec = peer_common.load_spec()
        self.labels, self.pp = spec["labels"], spec["preprocessing"]
        self.session = peer_common.session(spec["onnx"], _DEVICE)
        self.input_name = self.session.get_inputs()[0].name

    @serve.batch(max_batch_size=_MAX_BATCH, batch_wait_timeout_s=0.01)
    async def classify(self, images: list[bytes]) -> list[dict]:
        batch = np.stack([peer_common.straightforward_pixels(peer_common.open_image(b), self.pp) for b in images])
        logits = self.session.run(None, {self.input_name: batch})[0]
        return [peer_common.top_k(row, self.labels) for row in logits]

    async def __call__(self, request: Request) -> dict:
        form = await request.form()
        return await self.classify(await form["image"].read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    # A local single-node Ray without its dashboard (not needed to serve), the model spec passed to the replicas.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("PEERS_")}})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(ImageClassifier.bind(), route_prefix="/classify")
    print(f"ray serve ready at http://{args.host}:{args.port}/classify", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
