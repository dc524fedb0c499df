"""GPU JPEG decoding (service/gpu_decode.py) where it cannot run: the CPU path serves, and the logic around the
decoder (which JPEGs go to it, batching concurrent requests, resize + crop on the device or on the CPU, falling
back per image, the start-up check and the status it leaves) runs with stand-ins built on PIL, since nvImageCodec
and CV-CUDA need a GPU. The service is forced onto the CPU where a test needs it, so the suite passes on CUDA
hosts too."""
from __future__ import annotations

import asyncio
import io
import logging

import numpy as np
import pytest
from PIL import Image

from tuneserve.models.preprocessing import Preprocessing, full_scale_jpeg, preprocess_pixels
from tuneserve.service.gpu_decode import GpuJpegDecoder, gpu_pixels, reference_jpegs
from support import encode, make_engine, photo


class _Decoded:
    """What nvImageCodec's decode returns per image: `.shape` (H, W, C), and `.cpu()` a host image numpy reads."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels
        self.shape = pixels.shape

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


class CropStandIn:
    """CvCudaCrop's contract (decoded image, pp) -> uint8 (S, S, 3) on the host, with PIL; `shift` levels off
    (a resize filter unlike PIL's), `fail_size` raising for images of that width."""

    def __init__(self, shift: int = 0, fail_width: int | None = None):
        self.calls = 0
        self.shift, self.fail_width = shift, fail_width

    def __call__(self, image: _Decoded, pp: Preprocessing) -> np.ndarray:
        self.calls += 1
        if image.shape[1] == self.fail_width:
            raise RuntimeError("stand-in resize failure")
        return np.clip(gpu_pixels(image.cpu(), pp).astype(np.int16) + self.shift, 0, 255).astype(np.uint8)


def test_a_cpu_service_never_tries_and_missing_nvimagecodec_says_why(model, caplog):
    engine = make_engine(models=model.tag, device="cpu")  # forced: on a CUDA host "auto" would plan for the GPU
    try:
        assert engine.plan.device == "cpu" and engine.shared.gpu_decoder is None
    finally:
        engine.close()
    with caplog.at_level(logging.INFO, logger="tuneserve.service"):
        decoder, status = GpuJpegDecoder.try_load()  # not installed here (a GPU host installs tuneserve[gpu-decode])
    assert decoder is None and GpuJpegDecoder.load() is None
    assert status == "cpu (Pillow): nvImageCodec is not installed (pip install 'tuneserve[gpu-decode]')"
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
    with pytest.raises(ValueError, match=r"differs from the CPU path's by 4\.00 levels on average"):
        GpuJpegDecoder(StandIn(shift=4), None).check(reference_jpegs(), pp)


def test_a_device_crop_that_disagrees_moves_resize_and_crop_to_the_cpu_and_the_status_says_why():
    pp = Preprocessing()
    good = GpuJpegDecoder(StandIn(), None, CropStandIn())
    good.check(reference_jpegs(), pp)
    assert good.crops_on_device and good.status == "gpu (nvImageCodec decode, CV-CUDA resize + crop)"

    off = GpuJpegDecoder(StandIn(), None, CropStandIn(shift=3))
    off.check(reference_jpegs(), pp)  # the decode itself agrees: kept, with the CPU resizing
    assert not off.crops_on_device
    assert off.status == ("gpu (nvImageCodec decode; resize + crop on the CPU: CV-CUDA's resize + crop failed the "
                          "start-up check (reference photo 0: the model's input differs from the CPU path's by 3.00 "
                          "levels on average (at most 1.0 accepted)))")
    assert GpuJpegDecoder(StandIn(), None).status.endswith("resize + crop on the CPU: CV-CUDA is not in use)")


def test_preprocess_returns_the_models_input_batched_with_per_image_fallback():
    """Concurrent preprocess() calls meet in batches; the model input is the CPU path's; an image the decoder
    fails on, and one the device crop fails on, come back None (the caller's CPU path) and are counted."""
    pp = Preprocessing()
    names = ["rocket.jpg", "grace_hopper.jpg"]
    odd = encode(Image.new("RGB", (333, 250), (10, 200, 30)), "JPEG")
    stand_in, crop = StandIn(fail=photo("grace_hopper.jpg")), CropStandIn(fail_width=333)
    decoder = GpuJpegDecoder(stand_in, None, crop)

    async def all_at_once():
        jobs = [decoder.preprocess(photo(names[i % 2]), pp) for i in range(10)] + [decoder.preprocess(odd, pp)]
        return await asyncio.gather(*jobs, decoder.decode(photo("rocket.jpg")))

    try:
        *crops, full = asyncio.run(all_at_once())
    finally:
        decoder.close()
    for i, pixels in enumerate(crops[:10]):
        if names[i % 2] == "grace_hopper.jpg":
            assert pixels is None
        else:
            np.testing.assert_array_equal(pixels, preprocess_pixels(photo("rocket.jpg"), pp))
    assert crops[10] is None  # the device crop failed: the CPU decodes it
    np.testing.assert_array_equal(full, np.asarray(Image.open(io.BytesIO(photo("rocket.jpg"))).convert("RGB")))
    assert sum(stand_in.batches) == 12 and max(stand_in.batches) > 1
    assert decoder.counts.as_dict() == {"gpu": 6, "fallback": 6}


def test_without_a_device_crop_preprocess_crops_the_decoded_pixels_on_a_cpu_thread():
    pp = Preprocessing(input_size=96, resize_size=110)
    decoder = GpuJpegDecoder(StandIn(), None)
    try:
        pixels = asyncio.run(decoder.preprocess(photo("rocket.jpg"), pp))
    finally:
        decoder.close()
    np.testing.assert_array_equal(pixels, preprocess_pixels(photo("rocket.jpg"), pp))


def test_concurrent_requests_decode_in_batches_and_failures_fall_back_to_the_cpu(model):
    """Through the service's own preprocessing, with a (stand-in) GPU decoder: 12 concurrent requests' JPEGs
    meet in batches, one image the decoder fails on is decoded by the CPU, PNGs never reach it, and every answer
    is the CPU path's."""
    names = ["rocket.jpg", "grace_hopper.jpg", "coffee.png"]
    engine = make_engine(models=model.tag, device="cpu")
    stand_in = StandIn(fail=photo("grace_hopper.jpg"))
    # Where start-up would have put nvImageCodec (Shared is frozen: set once, as start-up does).
    object.__setattr__(engine.shared, "gpu_decoder", GpuJpegDecoder(stand_in, None))
    served, pp = engine.versions.get(None), model.card.preprocessing

    async def all_at_once():
        return await asyncio.gather(*(served.preprocess(photo(names[i % 3]), engine.admission.deadline())
                                      for i in range(12)))

    try:
        arrays = asyncio.run(all_at_once())
    finally:
        engine.close()
    for i, pixels in enumerate(arrays):
        np.testing.assert_array_equal(pixels, preprocess_pixels(photo(names[i % 3]), pp))
    assert sum(stand_in.batches) == 8 and max(stand_in.batches) > 1  # 8 JPEGs, gathered
