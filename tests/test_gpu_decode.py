"""GPU JPEG decoding (service/gpu_decode.py) where it cannot run: the CPU path serves, and the logic around the
decoder (which JPEGs go to it, batching concurrent requests, falling back per image, the start-up check) runs
with a stand-in decoder built on PIL, since nvImageCodec needs a GPU."""
from __future__ import annotations

import asyncio
import io
import logging

import numpy as np
import pytest
from PIL import Image

from tuneserve.models.preprocessing import Preprocessing, full_scale_jpeg, preprocess_pixels
from tuneserve.service.gpu_decode import GpuJpegDecoder, reference_jpegs
from support import encode, make_worker, photo


class _Decoded:
    """What nvImageCodec's decode returns per image: `.cpu()` gives a host image numpy can read."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    def cpu(self) -> np.ndarray:
        return self.pixels


class StandIn:
    """nvImageCodec's Decoder.decode(list, params) on the CPU: PIL, upright RGB; records each batch's size."""

    def __init__(self, shift: int = 0, fail: bytes | None = None):
        self.batches: list[int] = []
        self.shift, self.fail = shift, fail

    def decode(self, datas, params=None):
        from PIL import ImageOps

        self.batches.append(len(datas))
        out = []
        for d in datas:
            img = ImageOps.exif_transpose(Image.open(io.BytesIO(d))).convert("RGB")
            out.append(None if d == self.fail else _Decoded(np.clip(np.asarray(img, np.int16) + self.shift, 0, 255).astype(np.uint8)))
        return out


def test_cpu_hosts_never_try_and_missing_nvimagecodec_means_the_cpu_path(model, caplog):
    worker = make_worker(models=model.tag)
    try:
        assert worker.plan.device == "cpu" and worker.gpu_decoder is None
        assert worker.get(None).describe()["runtime"]["jpeg_decoder"] == "cpu (Pillow)"
    finally:
        worker.close()
    with caplog.at_level(logging.INFO, logger="tuneserve.service"):
        assert GpuJpegDecoder.load() is None  # not installed here (a GPU host installs tuneserve[gpu-decode])
    assert "JPEG decoding stays on the CPU" in caplog.text


def test_only_jpegs_decode_would_take_at_full_scale_go_to_the_gpu(tmp_path):
    pp = Preprocessing()  # draft decoding from a 768 px shorter side
    jpeg = photo("rocket.jpg")
    assert full_scale_jpeg(jpeg, pp)
    assert full_scale_jpeg(encode(Image.new("L", (300, 200), 90), "JPEG"), pp)  # grey
    assert not full_scale_jpeg(encode(Image.new("RGB", (1600, 1600)), "JPEG"), pp)  # drafted on the CPU instead
    assert full_scale_jpeg(encode(Image.new("RGB", (1600, 1600)), "JPEG"), Preprocessing(jpeg_draft_factor=0))
    assert not full_scale_jpeg(encode(Image.new("CMYK", (64, 64)), "JPEG"), pp)
    assert not full_scale_jpeg(photo("coffee.png"), pp)
    assert not full_scale_jpeg(jpeg[: len(jpeg) // 3], pp)  # truncated: the CPU path refuses it by name
    assert not full_scale_jpeg(jpeg, pp, max_pixels=100)
    assert not full_scale_jpeg(b"not an image", pp)


def test_the_start_up_check_accepts_the_same_pixels_and_refuses_others():
    pp = Preprocessing()
    GpuJpegDecoder(StandIn(), None).check(reference_jpegs(), pp)
    with pytest.raises(ValueError, match=r"differs from the CPU decode's by 4\.00 levels on average"):
        GpuJpegDecoder(StandIn(shift=4), None).check(reference_jpegs(), pp)


def test_concurrent_requests_decode_in_batches_and_failures_fall_back_to_the_cpu(model):
    """With a (stand-in) GPU decoder, 12 concurrent requests' JPEGs meet in batches, one image the decoder
    fails on is decoded by the CPU, PNGs never reach it, and every answer is the CPU path's."""
    names = ["rocket.jpg", "grace_hopper.jpg", "coffee.png"]
    worker = make_worker(models=model.tag)
    stand_in = StandIn(fail=photo("grace_hopper.jpg"))
    worker.gpu_decoder = GpuJpegDecoder(stand_in, None)
    served, pp = worker.get(None), model.card.preprocessing

    async def all_at_once():
        deadline = worker.deadline()
        return await asyncio.gather(*(served.preprocess(photo(names[i % 3]), deadline) for i in range(12)))

    try:
        arrays = asyncio.run(all_at_once())
    finally:
        worker.close()
    for i, pixels in enumerate(arrays):
        np.testing.assert_array_equal(pixels, preprocess_pixels(photo(names[i % 3]), pp))
    assert sum(stand_in.batches) == 8 and max(stand_in.batches) > 1  # 8 JPEGs, gathered
