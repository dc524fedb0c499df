"""JPEG decoding on the GPU for CUDA hosts: nvImageCodec (nvJPEG, and the hardware JPEG engines of A100/H100),
batched across concurrent requests, with the CPU path (PIL) wherever it cannot run.

Why: on a GPU host the model leaves the CPU, and decoding is about half of what an image still costs the host's
CPUs (docs/benchmarks.md, "Host cost per image"); batched nvJPEG decodes several thousand photos a second. What
stays on the CPU: the resize and centre crop (of the decoded pixels, copied back: a 500 x 375 photo is 0.56 MB),
JPEGs large enough for draft decoding (a 1/2 to 1/8 scale decode on the CPU is cheaper than a full one copied
back), every other format, and any image the GPU decoder fails on.

Chosen at start-up: `GpuJpegDecoder.load()` gives a decoder only where nvImageCodec imports
(`pip install 'tuneserve[gpu-decode]'`), starts on the GPU and decodes the reference photos to the pixels the
model was validated on (the model's input within MAX_MEAN_LEVEL_DIFF of the CPU path's: nvJPEG's IDCT and
chroma upsampling are not libjpeg-turbo's); otherwise None, with the reason in the log, and the CPU path serves.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tuneserve.models.preprocessing import Preprocessing, eval_pixels, preprocess_pixels

log = logging.getLogger("tuneserve.service")

# Mean |difference| of the model's input pixels (0-255 levels) between the GPU and the CPU decode of the
# reference photos: draft decoding, which the model cards accept, moves them by less than 1 level on average.
MAX_MEAN_LEVEL_DIFF = 1.0
MAX_BATCH = 64  # images per nvImageCodec call: the hardware decoders take batches; more only adds latency


class GpuJpegDecoder:
    """`await decoder.decode(data)` -> uint8 (H, W, 3) RGB pixels, upright (EXIF applied), or None when the GPU
    could not decode it (the caller decodes it on the CPU). Concurrent calls are decoded in one batch."""

    def __init__(self, decoder: Any, params: Any):
        self._decoder, self._params = decoder, params
        self._queue: collections.deque[tuple[bytes, asyncio.Future]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One batch at a time, off the event loop: the decoder keeps the GPU busy, a second call would queue there.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tuneserve-gpu-decode")

    @classmethod
    def load(cls, device_id: int = 0, reference: list[bytes] | None = None,
             pp: Preprocessing | None = None) -> "GpuJpegDecoder | None":
        """A decoder on GPU `device_id` that decodes `reference` (JPEGs; default reference_jpegs()) as the CPU
        does, to the model input `pp` makes (default: Preprocessing()); None otherwise."""
        try:
            from nvidia import nvimgcodec
        except ImportError:
            log.info("JPEG decoding stays on the CPU: nvImageCodec is not installed (pip install 'tuneserve[gpu-decode]')")
            return None
        try:
            decoder = nvimgcodec.Decoder(device_id=device_id, backends=[
                nvimgcodec.Backend(nvimgcodec.HW_GPU_ONLY), nvimgcodec.Backend(nvimgcodec.GPU_ONLY)])
            params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.RGB,
                                             allow_any_depth=False)
            self = cls(decoder, params)
            self.check(reference or reference_jpegs(), pp or Preprocessing())
        except Exception as e:  # noqa: BLE001 - no CUDA, no nvJPEG, a mismatch: each means the CPU path
            log.warning("JPEG decoding stays on the CPU: nvImageCodec cannot serve here (%s)", e)
            return None
        log.info("JPEG decoding on GPU %d with nvImageCodec (batched, up to %d per call)", device_id, MAX_BATCH)
        return self

    def decode_batch(self, datas: list[bytes]) -> list[np.ndarray | None]:
        """Blocking: uint8 (H, W, 3) pixels per JPEG, None where the GPU failed."""
        images = self._decoder.decode(datas, params=self._params)
        return [None if im is None else np.asarray(im.cpu()) for im in images]

    def check(self, reference: list[bytes], pp: Preprocessing) -> None:
        """ValueError unless the GPU decodes every `reference` JPEG to the model input the CPU path makes."""
        for i, (gpu, data) in enumerate(zip(self.decode_batch(reference), reference)):
            if gpu is None:
                raise ValueError(f"reference photo {i} did not decode")
            ours = gpu_pixels(gpu, pp).astype(np.int16)
            cpu = preprocess_pixels(data, pp).astype(np.int16)
            diff = float(np.abs(ours - cpu).mean()) if ours.shape == cpu.shape else float("inf")
            if diff > MAX_MEAN_LEVEL_DIFF:
                raise ValueError(f"reference photo {i}: the model's input differs from the CPU decode's by {diff:.2f} "
                                 f"levels on average (at most {MAX_MEAN_LEVEL_DIFF} accepted)")

    async def decode(self, data: bytes) -> np.ndarray | None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._serve(), name="tuneserve-gpu-decode")
        future = loop.create_future()
        self._queue.append((data, future))
        self._wake.set()
        return await future

    async def _serve(self) -> None:
        """Whenever the decoder is free, every queued JPEG (up to MAX_BATCH) goes in one call."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                taken = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
                try:
                    decoded = await loop.run_in_executor(self._thread, self.decode_batch, [d for d, _ in taken])
                except Exception as e:  # noqa: BLE001 - the CPU decodes this batch instead
                    log.warning("GPU JPEG decoding failed for a batch of %d (%s); decoding it on the CPU", len(taken), e)
                    decoded = [None] * len(taken)
                for (_, future), pixels in zip(taken, decoded):
                    if not future.done():  # its request may have gone
                        future.set_result(pixels)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


def gpu_pixels(decoded: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """Decoded uint8 (H, W, 3) pixels -> the model's uint8 (S, S, 3) input, resized and cropped as `decode`'s are."""
    from PIL import Image

    return eval_pixels(Image.fromarray(decoded), pp)


def reference_jpegs() -> list[bytes]:
    """Two JPEGs as cameras and browsers write them, made here (the serving image ships no photos): 500 x 375
    colour with 4:2:0 chroma (smooth gradients and fine texture, where IDCT and upsampling differences show),
    and 375 x 500 grey."""
    import io

    from PIL import Image

    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    texture = 40 * np.sin(x / 3.0) * np.cos(y / 5.0)
    rgb = np.stack([x / 500 * 200 + texture, y / 375 * 200 - texture, (x + y) / 875 * 255], axis=-1)
    out = []
    for img in (Image.fromarray(np.clip(rgb + 28, 0, 255).astype(np.uint8)),
                Image.fromarray(np.clip(rgb[..., 0].T + 28, 0, 255).astype(np.uint8))):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out
