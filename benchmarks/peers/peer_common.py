"""What every peer server shares, so that only the serving framework differs between them: the model spec
(ONNX path, labels, the card's preprocessing), the device choice, the onnxruntime session, the
"straightforward" PIL preprocessing a user writes from the frameworks' image examples, and the answer
(softmax, top-5, JSON as tuneserve's /classify gives it).

The spec comes from the environment, because BentoML imports its service module itself (no argv of ours):
    PEERS_MODEL_SPEC   JSON file: {"onnx": path, "labels": [...], "preprocessing": Preprocessing.to_dict()}
    PEERS_DEVICE       auto (CUDA when onnxruntime has it and a GPU is present) | cpu | cuda
    PEERS_MAX_BATCH    the frameworks' max batch size (compare.py passes tuneserve's default for the device)
    PEERS_WORKERS      worker processes / replicas (default: each framework's documented recommendation)
No torch, no BentoML and no tuneserve imports here: the LitServe and Ray peers run in their own venv.
"""
from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
from PIL import Image

TOP_K = 5  # tuneserve's default top_k, so every server does the same softmax + top-k work per image

_INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                   "bicubic": Image.Resampling.BICUBIC}


def load_spec() -> dict:
    path = os.environ.get("PEERS_MODEL_SPEC")
    if not path:
        raise SystemExit("error: PEERS_MODEL_SPEC is not set (a JSON file with onnx, labels, preprocessing; "
                         "benchmarks/peers/compare.py writes one)")
    with open(path) as f:
        return json.load(f)


def device() -> str:
    """cpu or cuda. auto: CUDA when a GPU is present and this onnxruntime has the CUDA provider."""
    import onnxruntime as ort

    wanted = os.environ.get("PEERS_DEVICE", "auto")
    if wanted == "auto":
        gpu = bool(glob.glob("/dev/nvidia[0-9]*"))
        return "cuda" if gpu and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return wanted


def max_batch_size(device_: str) -> int:
    """Same bound as tuneserve's default for the device (CPU 8, CUDA 64), so batch size limits are equal."""
    return int(os.environ.get("PEERS_MAX_BATCH") or (64 if device_ == "cuda" else 8))


def workers(default: int) -> int:
    return int(os.environ.get("PEERS_WORKERS") or default)


def session(onnx_path: str, device_: str, tuneserve_threads: int = 0):
    """An onnxruntime session as onnxruntime's own docs create one: default options, CUDA provider first on
    a GPU. `tuneserve_threads` > 0: tuneserve's CPU settings instead (that many intra-op threads, idle ones
    sleeping rather than spinning: session.intra_op.allow_spinning=0), for the 'same shortcuts' peer."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if tuneserve_threads and device_ == "cpu":
        opts.intra_op_num_threads = tuneserve_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device_ == "cuda":
        ort.preload_dlls()  # CUDA/cuDNN from pip's nvidia-* wheels (onnxruntime-gpu[cuda,cudnn])
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(onnx_path, sess_options=opts, providers=providers)
    if sess.get_providers()[0] != providers[0]:
        raise RuntimeError(f"onnxruntime could not start {providers[0]} (runs on {sess.get_providers()[0]})")
    return sess


def straightforward_pixels(img: Image.Image, pp: dict) -> np.ndarray:
    """The preprocessing a user writes from the frameworks' image-classification examples, following the
    model card (torchvision's Resize(resize_size) + CenterCrop(input_size), done with PIL because the graph
    takes uint8 pixels and normalises itself): full decode, convert to RGB, resize the whole image so the
    shorter side is resize_size, centre-crop input_size. -> uint8 (S, S, 3).
    What tuneserve does differently: JPEG draft decoding of large photos, resampling only the columns the
    crop keeps, EXIF orientation (models/preprocessing.py)."""
    img = img.convert("RGB")
    w, h = img.size
    size, crop = pp["resize_size"], pp["input_size"]
    # torchvision's rounding: the shorter side becomes `size`, the longer int(size * long / short)
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((new_w, new_h), _INTERPOLATIONS[pp["interpolation"]])
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def top_k(logits: np.ndarray, labels: list[str], k: int = TOP_K) -> dict:
    """One image's logits (classes,) -> {"predictions": [{"label", "score"}, ...]} best first, softmax
    scores: the same JSON shape as tuneserve's /classify (without its "model" field)."""
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z)
    p /= p.sum()
    idx = np.argsort(-p, kind="stable")[:k]
    return {"predictions": [{"label": labels[i], "score": float(p[i])} for i in idx]}
