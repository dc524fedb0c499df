"""JPEG decoding, resizing and centre cropping on the GPU for CUDA hosts: nvImageCodec decodes (nvJPEG, and the
hardware JPEG engines of A100/H100), batched across concurrent requests, and CV-CUDA resizes and crops the decoded
image where it lies, so only the model's uint8 (S, S, 3) input comes back to the host. The CPU path (PIL) serves
wherever this cannot run.

Why these libraries rather than DALI: the service's unit of work is whatever requests are waiting now, not a
dataset. nvImageCodec and CV-CUDA are plain per-call libraries: one decode call per gathered batch, then two
operators per image on the same CUDA stream, with zero-copy hand-over through `__cuda_array_interface__`, no
pipeline graph to build per batch shape, no executor threads or prefetch queues of its own, and no torch. DALI
(built on the same nvJPEG) pays off for training input pipelines with fixed operator graphs and ships as one
much larger wheel. CV-CUDA's HQ resize has antialiasing, as PIL's resize has when shrinking, so the model's
input stays within a level of what the CPU path makes.

Why on the GPU: on a GPU host the model leaves the CPU, and decoding is about half of what an image still costs
the host's CPUs (docs/benchmarks.md, "Host cost per image"); batched nvJPEG decodes several thousand photos a
second, and keeping the decoded image on the device saves the copy of full-size pixels back to the host (a
500 x 375 photo is 0.56 MB; its 224 x 224 crop 0.15 MB) and the resize on a CPU core.
What stays on the CPU: JPEGs large enough for draft decoding (a 1/2 to 1/8 scale decode on the CPU is cheaper),
every other format, and any image the GPU fails on.

Chosen at start-up: `GpuJpegDecoder.try_load()` gives a decoder where nvImageCodec imports and decodes the
reference photos to the model input the CPU path makes (within MAX_MEAN_LEVEL_DIFF: nvJPEG's IDCT and chroma
upsampling are not libjpeg-turbo's, CV-CUDA's filters are not PIL's). Resize and crop run on the GPU when
CV-CUDA is installed and passes the same check; otherwise on the CPU from the decoded pixels. The result's
`status` says which, and why anything fell back, for /model, metrics and the log; `None` with the reason
when nothing runs on the GPU.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tuneserve.models.preprocessing import (Preprocessing, center_offsets, eval_pixels, preprocess_pixels,
                                            shorter_side_size)

log = logging.getLogger("tuneserve.service")

# Mean |difference| of the model's input pixels (0-255 levels) between the GPU and the CPU path on the
# reference photos: draft decoding, which the model cards accept, moves them by less than 1 level on average.
MAX_MEAN_LEVEL_DIFF = 1.0
MAX_BATCH = 64  # images per nvImageCodec call: the hardware decoders take batches; more only adds latency

CPU_STATUS = "cpu (Pillow)"


@dataclass
class DecodeCounts:
    """Images by where they were decoded, since start-up (for metrics)."""
    gpu: int = 0  # decoded (and, with `crops_on_device`, resized and cropped) on the GPU
    fallback: int = 0  # sent to the GPU, failed there, decoded on the CPU instead

    def as_dict(self) -> dict[str, int]:
        return {"gpu": self.gpu, "fallback": self.fallback}


class CvCudaCrop:
    """A decoded image on the GPU (nvImageCodec Image, HWC uint8 RGB) -> the model's uint8 (S, S, 3) input on the
    host: CV-CUDA's HQ resize (antialiased, the shorter side to pp.resize_size, torchvision's rounding of the
    longer) and a centre crop (torchvision's offsets), then one copy of the crop to the host."""

    INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

    def __init__(self):
        import cvcuda
        from nvidia import nvimgcodec

        self._cvcuda, self._nvimgcodec = cvcuda, nvimgcodec
        self._interp = {"nearest": cvcuda.Interp.NEAREST, "bilinear": cvcuda.Interp.LINEAR,
                        "bicubic": cvcuda.Interp.CUBIC}

    def __call__(self, image: Any, pp: Preprocessing) -> np.ndarray:
        cvcuda = self._cvcuda
        if pp.interpolation not in self._interp:
            raise ValueError(f"interpolation {pp.interpolation!r} has no CV-CUDA equivalent here "
                             f"(accepted: {', '.join(self.INTERPOLATIONS)})")
        h, w = image.shape[:2]
        src = cvcuda.as_tensor(image, "HWC")  # zero-copy view of the decoded image
        new_w, new_h = shorter_side_size(w, h, pp.resize_size)
        if (new_w, new_h) != (w, h):
            src = cvcuda.hq_resize(src, (new_h, new_w), antialias=True, interpolation=self._interp[pp.interpolation])
        left, top = center_offsets(new_w, new_h, pp.input_size)
        s = pp.input_size
        crop = cvcuda.customcrop(src, cvcuda.RectI(x=left, y=top, width=s, height=s))  # (S, S, 3) uint8 on the GPU
        return np.asarray(self._nvimgcodec.as_image(crop.cuda()).cpu())  # one 0.15 MB copy for 224 px


class GpuJpegDecoder:
    """`await decoder.preprocess(data, pp)` -> the model's uint8 (S, S, 3) input; `await decoder.decode(data)`
    -> uint8 (H, W, 3) RGB pixels, upright (EXIF applied); either None when the GPU could not do it (the caller
    decodes that image on the CPU). Concurrent calls are decoded in one batch.

    `decoder`: nvImageCodec's Decoder (or a stand-in with its `decode(list of bytes, params=)`); `crop`: a
    callable (decoded image, pp) -> uint8 (S, S, 3) on the host, None to resize and crop on the CPU."""

    def __init__(self, decoder: Any, params: Any, crop: Callable[[Any, Preprocessing], np.ndarray] | None = None):
        self._decoder, self._params, self._crop = decoder, params, crop
        self._queue: collections.deque[tuple[bytes, Preprocessing | None, asyncio.Future]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One batch at a time, off the event loop: the decoder keeps the GPU busy, a second call would queue there.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tuneserve-gpu-decode")
        self.counts = DecodeCounts()
        self.cpu_crop_reason: str | None = None if crop is not None else "CV-CUDA is not in use"

    @property
    def crops_on_device(self) -> bool:
        """True when resize and crop run on the GPU (preprocess returns the crop without a CPU step)."""
        return self._crop is not None

    @property
    def status(self) -> str:
        """What runs where, for /model and metrics: 'gpu (nvImageCodec decode, CV-CUDA resize + crop)', or
        'gpu (nvImageCodec decode; resize + crop on the CPU: <why>)'."""
        if self._crop is not None:
            return "gpu (nvImageCodec decode, CV-CUDA resize + crop)"
        return f"gpu (nvImageCodec decode; resize + crop on the CPU: {self.cpu_crop_reason})"

    @classmethod
    def try_load(cls, device_id: int = 0, reference: list[bytes] | None = None,
                 pp: Preprocessing | None = None) -> tuple["GpuJpegDecoder | None", str]:
        """(decoder, its status) on GPU `device_id` when it makes the model input `pp` makes (default:
        Preprocessing()) from `reference` (JPEGs; default reference_jpegs()) as the CPU does; else
        (None, 'cpu (Pillow): <why>')."""
        try:
            from nvidia import nvimgcodec
        except ImportError:
            return cls._unavailable("nvImageCodec is not installed (pip install 'tuneserve[gpu-decode]')", logging.INFO)
        try:
            decoder = nvimgcodec.Decoder(device_id=device_id, backends=[
                nvimgcodec.Backend(nvimgcodec.HW_GPU_ONLY), nvimgcodec.Backend(nvimgcodec.GPU_ONLY)])
            params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.RGB,
                                             allow_any_depth=False)
        except Exception as e:  # noqa: BLE001 - no CUDA, no nvJPEG: the CPU path
            return cls._unavailable(f"nvImageCodec cannot start on GPU {device_id} ({e})")
        crop, why_not = cls._cv_cuda()
        self = cls(decoder, params, crop)
        if why_not:
            self.cpu_crop_reason = why_not
        try:
            self.check(reference or reference_jpegs(), pp or Preprocessing())
        except Exception as e:  # noqa: BLE001 - a mismatch or a failure: the CPU path, and why
            self.close()
            return cls._unavailable(f"nvImageCodec on GPU {device_id} failed the start-up check ({e})")
        self.counts = DecodeCounts()  # the check's reference photos are not traffic
        log.info("JPEG decoding on GPU %d: %s, batched up to %d per call", device_id, self.status, MAX_BATCH)
        return self, self.status

    @classmethod
    def load(cls, device_id: int = 0, reference: list[bytes] | None = None,
             pp: Preprocessing | None = None) -> "GpuJpegDecoder | None":
        """try_load's decoder, or None (the reason is in the log; try_load returns it)."""
        return cls.try_load(device_id, reference, pp)[0]

    @staticmethod
    def _unavailable(reason: str, level: int = logging.WARNING) -> tuple[None, str]:
        log.log(level, "JPEG decoding stays on the CPU: %s", reason)
        return None, f"{CPU_STATUS}: {reason}"

    @staticmethod
    def _cv_cuda() -> tuple[CvCudaCrop | None, str | None]:
        try:
            return CvCudaCrop(), None
        except ImportError:
            return None, "CV-CUDA is not installed (pip install 'tuneserve[gpu-decode]')"
        except Exception as e:  # noqa: BLE001 - installed but cannot start: resize on the CPU, and why
            return None, f"CV-CUDA cannot start ({e})"

    # -- blocking work, on the decoding thread --------------------------------------------------------------------

    def decode_batch(self, datas: list[bytes]) -> list[np.ndarray | None]:
        """Blocking: uint8 (H, W, 3) pixels per JPEG, None where the GPU failed."""
        return self.preprocess_batch(datas, [None] * len(datas))

    def preprocess_batch(self, datas: list[bytes], pps: list[Preprocessing | None]) -> list[np.ndarray | None]:
        """Blocking: per JPEG, the model's uint8 (S, S, 3) input for its `pp` (full-size (H, W, 3) pixels where
        `pp` is None); None where the GPU failed on it."""
        images = self._decoder.decode(datas, params=self._params)
        out: list[np.ndarray | None] = []
        for image, pp in zip(images, pps):
            try:
                out.append(None if image is None else self._finish(image, pp))
            except Exception as e:  # noqa: BLE001 - this image goes to the CPU; the others are unaffected
                log.warning("GPU resize/crop failed for one image (%s); decoding it on the CPU", e)
                out.append(None)
        done = sum(x is not None for x in out)
        self.counts.gpu += done
        self.counts.fallback += len(out) - done
        return out

    def _finish(self, image: Any, pp: Preprocessing | None) -> np.ndarray:
        if pp is None:
            return np.asarray(image.cpu())
        if self._crop is not None:
            return self._crop(image, pp)
        return gpu_pixels(np.asarray(image.cpu()), pp)

    def check(self, reference: list[bytes], pp: Preprocessing) -> None:
        """ValueError unless the GPU makes the model input the CPU path makes from every `reference` JPEG. When
        only the GPU's resize + crop is off, they move to the CPU (see `status`) and the decode is checked alone."""
        cpu = [preprocess_pixels(data, pp).astype(np.int16) for data in reference]
        if self._crop is not None:
            problem = self._compare(self.preprocess_batch(reference, [pp] * len(reference)), cpu)
            if problem is None:
                return
            self.cpu_crop_reason = f"CV-CUDA's resize + crop failed the start-up check ({problem})"
            log.warning("GPU JPEG decoding: %s; resizing and cropping on the CPU", self.cpu_crop_reason)
            self._crop = None
        problem = self._compare(self.preprocess_batch(reference, [pp] * len(reference)), cpu)
        if problem is not None:
            raise ValueError(problem)

    @staticmethod
    def _compare(gpu: list[np.ndarray | None], cpu: list[np.ndarray]) -> str | None:
        for i, (ours, theirs) in enumerate(zip(gpu, cpu)):
            if ours is None:
                return f"reference photo {i} did not decode"
            ours = ours.astype(np.int16)
            diff = float(np.abs(ours - theirs).mean()) if ours.shape == theirs.shape else float("inf")
            if diff > MAX_MEAN_LEVEL_DIFF:
                return (f"reference photo {i}: the model's input differs from the CPU path's by {diff:.2f} levels on "
                        f"average (at most {MAX_MEAN_LEVEL_DIFF} accepted)")
        return None

    # -- the event loop's side ------------------------------------------------------------------------------------

    async def decode(self, data: bytes) -> np.ndarray | None:
        """uint8 (H, W, 3) RGB pixels, or None: decode it on the CPU."""
        return await self._submit(data, None)

    async def preprocess(self, data: bytes, pp: Preprocessing, executor: Executor | None = None) -> np.ndarray | None:
        """The model's uint8 (S, S, 3) input for `pp`, or None: decode it on the CPU. Without CV-CUDA
        (`crops_on_device` False) the decoded pixels are resized and cropped in `executor` (default: the loop's)."""
        if self._crop is not None:
            return await self._submit(data, pp)
        pixels = await self._submit(data, None)
        if pixels is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(executor, gpu_pixels, pixels, pp)

    async def _submit(self, data: bytes, pp: Preprocessing | None) -> np.ndarray | None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._serve(), name="tuneserve-gpu-decode")
        future = loop.create_future()
        self._queue.append((data, pp, future))
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
                    done = await loop.run_in_executor(self._thread, self.preprocess_batch, [d for d, _, _ in taken],
                                                      [pp for _, pp, _ in taken])
                except Exception as e:  # noqa: BLE001 - the CPU decodes this batch instead
                    log.warning("GPU JPEG decoding failed for a batch of %d (%s); decoding it on the CPU", len(taken), e)
                    self.counts.fallback += len(taken)
                    done = [None] * len(taken)
                for (_, _, future), pixels in zip(taken, done):
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
