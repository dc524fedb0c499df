"""models/explain.py draws a class's map over the photo as sent (torch-free), and `tuneserve predict --explain`
writes those overlays from a service's explain answers."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

from tuneserve.cli import main
from tuneserve.models.explain import colourise, crop_box, explained_top_k, normalise_heatmap, overlay, overlay_png
from tuneserve.models.preprocessing import Preprocessing, decode, eval_pixels
from tuneserve.models.runtime import OnnxClassifier
from support import photo, photo_path

PP = Preprocessing(input_size=224, resize_size=256, interpolation="bilinear",
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_heatmaps_normalise_to_the_unit_range_and_a_flat_map_is_zero():
    cam = np.array([[-3.0, 1.0], [5.0, 1.0]])
    assert np.array_equal(normalise_heatmap(cam), np.array([[0, 0.5], [1, 0.5]], np.float32))
    assert not normalise_heatmap(np.full((7, 7), 4.2)).any()
    with pytest.raises(ValueError, match=r"one class's \(h, w\) grid; got an array of shape \(1, 7, 7\)"):
        normalise_heatmap(np.zeros((1, 7, 7)))
    low, high = colourise(np.array([[0.0, 1.0]]))[0]
    assert low[2] > low[0] and high[0] > high[2]  # blue for cold, red for hot


def test_the_crop_box_is_the_centre_crop_the_model_saw():
    # 640 x 480: shorter side to 256 -> 341 x 256, centre 224 crop at (58, 16); back in photo pixels x 480/256.
    left, top, right, bottom = crop_box(640, 480, PP)
    scale = 480 / 256
    assert (left, top) == pytest.approx((58 * 640 / 341, 16 * scale)) and right - left == pytest.approx(224 * 640 / 341)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    inside = img.crop(tuple(round(v) for v in (left, top, right, bottom))).resize((224, 224), Image.BILINEAR)
    seen = eval_pixels(img, PP)  # the model's own input: the same region
    assert np.abs(np.asarray(inside, np.float32) - seen).mean() < 40  # same place (random pixels: a loose bound)


def test_the_overlay_is_the_photo_as_sent_with_the_heat_where_the_map_is_high():
    img = Image.new("RGB", (640, 480), (128, 128, 128))
    cam = np.zeros((7, 7))
    cam[0, 0] = 10.0  # the top-left location of the crop
    out = overlay(img, cam, PP, max_side=None)
    assert out.size == (640, 480) and out.mode == "RGB"
    left, top, right, bottom = (round(v) for v in crop_box(640, 480, PP))
    arr = np.asarray(out, np.int32)
    hot, cold = arr[top + 5, left + 5], arr[bottom - 5, right - 5]
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0]  # red-ish over the hot cell, blue-ish elsewhere
    assert (arr[240, 2] < 128).all()  # outside the crop (the left margin): dimmed, never coloured
    png = overlay_png(Image.new("RGB", (4000, 3000)), cam, PP)
    assert Image.open(io.BytesIO(png)).size == (1024, 768)  # large photos drawn at 1024 px, same framing


def test_the_overlay_module_runs_without_torch_or_matplotlib():
    code = ("import sys, numpy as np; from PIL import Image; from tuneserve.models import explain; "
            "explain.overlay_png(Image.new('RGB', (50, 40)), np.ones((7, 7)), "
            "explain.Preprocessing(32, 36, 'bilinear', (0.5,) * 3, (0.5,) * 3)); "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class ExplainContract(BaseHTTPRequestHandler):
    """POST /explain and /models/{name}/explain as the service will answer them (the JSON contract
    `tuneserve predict --explain` reads), computed with the real engine and overlay code."""
    session: OnnxClassifier
    labels: list[str]
    pp: Preprocessing

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        if url.path not in ("/explain", "/models/imagenet/explain"):
            self.send_error(404)
            return
        k = int(parse_qs(url.query).get("top_k", ["3"])[0])
        image = decode(self.rfile.read(int(self.headers["content-length"])), self.pp)
        logits, cams = self.session.explain(eval_pixels(image, self.pp)[None])
        predictions = explained_top_k(image, logits[0], cams[0], self.labels, self.pp, k)
        body = json.dumps({"model": "imagenet:1", "predictions": predictions}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_predict_explain_writes_one_overlay_per_prediction(model, tmp_path, capsys):
    handler = type("Handler", (ExplainContract,), {"session": OnnxClassifier(model.explain_path, device="cpu"),
                                                   "labels": model.card.labels, "pp": model.card.preprocessing})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out_dir = tmp_path / "overlays"
        assert main(["predict", str(photo_path("coffee.png")), "--explain", "--top-k", "2", "--url", url,
                     "--output-dir", str(out_dir)]) == 0
        printed = capsys.readouterr().out
        files = sorted(out_dir.iterdir())
        assert len(files) == 2 and all(f.name.startswith("coffee.") and f.name.endswith(".explain.png") for f in files)
        assert "coffee.espresso.explain.png" in {f.name for f in files} and f"wrote {out_dir}" in printed
        assert Image.open(files[0]).size == Image.open(io.BytesIO(photo("coffee.png"))).size
        assert main(["predict", str(photo_path("chelsea.png")), "--explain", "--json", "--model", "imagenet",
                     "--url", url, "--output-dir", str(out_dir)]) == 0
        (answer,) = json.loads(capsys.readouterr().out)
        assert "overlay_png" not in answer["predictions"][0] and len(answer["predictions"][0]["heatmap"]) == 7
        heatmap = np.array(answer["predictions"][0]["heatmap"])  # the best class's map, normalised
        assert heatmap.min() == 0.0 and heatmap.max() == 1.0
        # A service without the route: the error and exit code 1, no file.
        assert main(["predict", str(photo_path("coffee.png")), "--explain", "--model", "other", "--url", url,
                     "--output-dir", str(tmp_path / "none")]) == 1
        assert "HTTP 404" in capsys.readouterr().err and not (tmp_path / "none").exists()
    finally:
        server.shutdown()


def test_explained_top_k_is_the_answer_contract():
    logits = np.array([0.5, 2.0, -1.0], np.float32)
    cams = np.stack([np.full((2, 2), v, np.float32) for v in logits]) + np.array([[0.5, -0.5], [0, 0]], np.float32)
    answer = explained_top_k(Image.new("RGB", (64, 48)), logits, cams, ["a", "b", "c"], PP, k=2)
    assert [p["label"] for p in answer] == ["b", "a"] and answer[0]["score"] > answer[1]["score"]
    assert answer[0]["heatmap"] == [[1.0, 0.0], [0.5, 0.5]]  # b's map 2.5, 1.5 / 2, 2, normalised
    assert Image.open(io.BytesIO(base64.b64decode(answer[0]["overlay_png"]))).size == (64, 48)
    assert "overlay_png" not in explained_top_k(Image.new("RGB", (8, 8)), logits, cams, ["a", "b", "c"], PP, 1,
                                                overlays=False)[0]
    with pytest.raises(ValueError, match=r"cams must be \(classes, h, w\) for 3 classes, got shape \(2, 2, 2\)"):
        explained_top_k(Image.new("RGB", (8, 8)), logits, cams[:2], ["a", "b", "c"], PP, 1)
