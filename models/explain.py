"""Class activation maps drawn over the photo: heatmap -> normalised grid -> coloured overlay -> PNG bytes.

The exported graph has a second output, CAM_OUTPUT: float32 (N, classes, h, w), each class's logit at every
location of the network's last feature grid (training/cam.py says how it is computed for each architecture;
for a linear head its mean over the grid is the logit itself). This module turns one (h, w) slice of it into
a picture on the photo as it was sent: the grid covers only the centre crop the model saw, so the heat is
drawn inside that box and the rest of the photo is dimmed.

numpy + Pillow only: the serving image (no torch, no matplotlib) and the CLI share it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tuneserve.models.preprocessing import Preprocessing, center_offsets, shorter_side_size

CAM_OUTPUT = "cams"  # the graph output's name: float32 (N, classes, h, w), per-location logits
DEFAULT_ALPHA = 0.5  # weight of the colour map where the heat is highest
OUTSIDE_DIM = 0.45  # brightness kept by the parts of the photo the centre crop cut away (the model never saw them)
DEFAULT_MAX_SIDE = 1024  # overlays of larger photos are drawn at this longer side: a 12-MP PNG is ~20 MB

# "turbo"-like colour map (Google's, perceptually ordered): anchors at 0, 1/8, ..., 1, interpolated linearly.
_ANCHORS = np.array([
    [48, 18, 59], [70, 107, 227], [40, 188, 235], [50, 241, 151], [164, 252, 60],
    [238, 207, 58], [251, 128, 34], [208, 47, 5], [122, 4, 3],
], dtype=np.float32)


def normalise_heatmap(cam: np.ndarray) -> np.ndarray:
    """cam: (h, w) per-location logits, any float dtype -> float32 (h, w) in [0, 1], min-max over the grid.

    A flat map (every location equal: nothing stands out) is all zeros, not a division by zero."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"a heatmap is one class's (h, w) grid; got an array of shape {cam.shape}")
    lo, hi = float(cam.min()), float(cam.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("the heatmap holds NaN or infinite values")
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(cam)
    return (cam - lo) / (hi - lo)


def colourise(heat: np.ndarray) -> np.ndarray:
    """heat: float (H, W) in [0, 1] -> uint8 (H, W, 3) RGB through the colour map (dark blue low, red high)."""
    x = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(x.astype(np.int64), len(_ANCHORS) - 2)
    t = (x - i)[..., None]
    return np.rint(_ANCHORS[i] * (1 - t) + _ANCHORS[i + 1] * t).astype(np.uint8)


def crop_box(width: int, height: int, pp: Preprocessing) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the photo's pixels of the centre crop the model saw: the photo resized so
    its shorter side is pp.resize_size, then cropped to pp.input_size (models/preprocessing.py's rounding)."""
    new_w, new_h = shorter_side_size(width, height, pp.resize_size)
    left, top = center_offsets(new_w, new_h, pp.input_size)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + pp.input_size) * sx, (top + pp.input_size) * sy)


def overlay(photo: Image.Image, cam: np.ndarray, pp: Preprocessing, alpha: float = DEFAULT_ALPHA,
            max_side: int | None = DEFAULT_MAX_SIDE) -> Image.Image:
    """One class's heatmap over `photo` (the decoded photo as sent, any size) -> RGB image of the photo's size
    (its longer side at most `max_side`; None: full size).

    The heat is normalised to [0, 1], upsampled bilinearly to the crop box the model saw, coloured, and
    blended with weight `alpha` × heat (cool regions keep the photo visible); outside the box the photo is
    dimmed, since the model never saw it."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    photo = photo.convert("RGB")
    width, height = photo.size
    left, top, right, bottom = crop_box(width, height, pp)
    scale = 1.0 if max_side is None else min(1.0, max_side / max(width, height))
    if scale < 1.0:
        photo = photo.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
        left, top, right, bottom = left * scale, top * scale, right * scale, bottom * scale
    base = np.asarray(photo, dtype=np.float32)  # (H, W, 3)
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(base.shape[1], round(right)), min(base.shape[0], round(bottom))
    out = base * OUTSIDE_DIM
    if x1 > x0 and y1 > y0:
        heat = Image.fromarray(normalise_heatmap(cam), mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        heat_arr = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)  # (y1-y0, x1-x0)
        weight = (alpha * (0.35 + 0.65 * heat_arr))[..., None]  # the hottest regions coloured most
        inside = base[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = inside * (1 - weight) + colourise(heat_arr).astype(np.float32) * weight
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def overlay_png(photo: Image.Image, cam: np.ndarray, pp: Preprocessing, alpha: float = DEFAULT_ALPHA,
                max_side: int | None = DEFAULT_MAX_SIDE) -> bytes:
    """`overlay` as PNG bytes (what the service sends, base64 in JSON or as image/png)."""
    return png_bytes(overlay(photo, cam, pp, alpha, max_side))


def explained_top_k(photo: Image.Image, logits: np.ndarray, cams: np.ndarray, labels: list[str], pp: Preprocessing,
                    k: int, overlays: bool = True) -> list[dict]:
    """One image's answer to explain: logits float32 (C,) and cams float32 (C, h, w) from
    OnnxClassifier.explain, `photo` the decoded photo as sent -> the k best classes, best first, as
    [{"label", "score", "heatmap": the class's (h, w) map min-max normalised to [0, 1] (normalise_heatmap, 4
    decimals, as the service answers), "overlay_png": the overlay as base64 PNG (left out with
    overlays=False)}]: the JSON `tuneserve predict --explain` reads."""
    import base64

    from tuneserve.models.runtime import softmax, top_k  # runtime imports this module's CAM_OUTPUT

    if cams.shape[0] != logits.shape[0] or cams.ndim != 3:
        raise ValueError(f"cams must be (classes, h, w) for {logits.shape[0]} classes, got shape {cams.shape}")
    predictions = top_k(softmax(logits), labels, k)
    for p in predictions:
        cam = cams[labels.index(p["label"])]
        p["heatmap"] = np.round(normalise_heatmap(cam), 4).tolist()
        if overlays:
            p["overlay_png"] = base64.b64encode(overlay_png(photo, cam, pp)).decode("ascii")
    return predictions
