"""The one evaluation transform: image bytes -> uint8 HWC pixels -> normalised float32 CHW array.

Training's validation, the ONNX parity gate, `tuneserve evaluate` and the HTTP service all call `decode` +
`eval_pixels` from here, then `normalise` (on the host, or inside graphs exported with pixel input, with the
same constants); training's augmenting pipelines call the same `decode`. So a model sees the same pixels
everywhere. It needs only PIL and numpy (no torch), which keeps the serving image lean.
`tests/test_preprocessing.py` checks it against torchvision's `Resize -> CenterCrop -> ToTensor -> Normalize`
within 1/255.
"""
from __future__ import annotations

import functools
import io
import os
from dataclasses import asdict, dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tuneserve.models.image_cost import decode_bytes, jpeg_shortfall

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# Formats PIL decodes that make sense as photos; anything else (PDF, EPS, ICO...) is refused by name.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")

# 40 megapixels: larger than any phone photo, far below what a decompression bomb expands to.
DEFAULT_MAX_PIXELS = 40_000_000

# JPEG draft decoding (libjpeg's DCT scaling to 1/2, 1/4 or 1/8) only while the decoded shorter side stays
# at least this many times resize_size, so the antialiased resize after it still averages >= 3x3 pixels.
# Measured (benchmarks/decode.py --agreement; docs/benchmarks.md, "JPEG draft decoding"): the 153 hymenoptera
# val photos at 5 sizes up to 4032x3024, built-in model: factor 3 moved probabilities by <= 0.037 and flipped
# no top-1 whose top two were more than 0.02 apart, and decoded 3-MP photos 2.5x and 12-MP ones 3.1x faster;
# factor 1 (straight to resize_size) moved them by up to 0.14 and flipped 3 clear top-1s.
DEFAULT_JPEG_DRAFT_FACTOR = 3


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; the message says why (shown to users as-is)."""


@dataclass(frozen=True)
class Preprocessing:
    """How pixels reach the network: resize the shorter side, centre-crop a square, normalise."""

    input_size: int = 224  # side of the square crop the network sees
    resize_size: int = 256  # shorter side after resizing, before the crop (input_size / crop_pct)
    interpolation: str = "bilinear"  # one of _INTERPOLATIONS, as the weights were trained
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Large JPEGs decode at a reduced scale that keeps >= this x resize_size pixels a side; 0 = always full.
    jpeg_draft_factor: int = DEFAULT_JPEG_DRAFT_FACTOR

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation={self.interpolation!r} is not supported; use one of {sorted(_INTERPOLATIONS)}"
            )
        if not 8 <= self.input_size <= self.resize_size:
            raise ValueError(
                f"need 8 <= input_size <= resize_size, got input_size={self.input_size}, "
                f"resize_size={self.resize_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={self.mean}, std={self.std}")
        if self.jpeg_draft_factor < 0:
            raise ValueError(f"jpeg_draft_factor must be 0 (full decode) or >= 1, got {self.jpeg_draft_factor}")

    @property
    def draft_size(self) -> int | None:
        """The smallest side a JPEG may be draft-decoded to (load_image's draft_size); None = full decode."""
        return self.jpeg_draft_factor * self.resize_size or None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            # Artifacts written before draft decoding existed measured their metrics on full decodes.
            jpeg_draft_factor=int(d.get("jpeg_draft_factor", 0)),
        )


ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]


def load_image(
    source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None,
    max_decode_bytes: int | None = None,
) -> Image.Image:
    """Decode a file path or bytes into an upright 8-bit RGB image.

    EXIF orientation is applied, animated GIF/WebP give their first frame, and modes L, LA, P, RGBA,
    CMYK, I, I;16 and F become RGB (transparent pixels over white). Raises ImageDecodeError with the
    reason for empty, non-image, truncated, unsupported-format or oversized input; oversized means more
    than `max_pixels`, or (when given) more than `max_decode_bytes` of memory to decode and convert
    (models/image_cost.py), both known from the header before decoding.
    `draft_size` lets JPEGs decode at a reduced scale (1/2, 1/4 or 1/8, keeping at least that many pixels a
    side): model inputs use `decode` (Preprocessing.draft_size); data checks use a small size, for speed.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        with open(os.fspath(source), "rb") as f:
            data = f.read()
    if len(data) == 0:
        raise ImageDecodeError("empty image: received 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError(
                    f"unsupported image format {img.format}; send one of {', '.join(SUPPORTED_FORMATS[:-1])}"
                )
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            img.seek(0)  # first frame of animations
            if img.format in ("JPEG", "MPO"):  # MPO: phone cameras' multi-picture JPEG
                shortfall = jpeg_shortfall(img, data)
                if shortfall:
                    raise ImageDecodeError(f"corrupt or {shortfall}")
                if draft_size:
                    img.draft("RGB", (draft_size, draft_size))
            if max_decode_bytes is not None and decode_bytes(img.mode, img.size) > max_decode_bytes:
                raise ImageDecodeError(
                    f"image is {width}x{height} {img.mode} pixels: decoding it needs about "
                    f"{decode_bytes(img.mode, img.size) // 2**20} MiB, over the limit of {max_decode_bytes // 2**20} MiB")
            img.load()  # decode now, so truncation is reported here and not later
            ImageOps.exif_transpose(img, in_place=True)  # upright photos (most) are not copied
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: the bytes match no known image format") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image rejected as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncated or corrupt data as OSError("image file is truncated ...") and friends.
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None


_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GREY:
        return _wide_grey_to_l(img).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Over white: paste through the alpha channel, which needs one RGB image beside the RGBA one
        # (alpha_composite would need two more RGBA images).
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey -> 8-bit grey, scaling the image's own range to 0..255 (not clipping at 255), without
    float64 copies of the whole image: 16-bit through a 65,536-entry table, 32-bit row block by row block."""
    arr = np.asarray(img)  # (H, W) uint16 / int32 / float32, a view where Pillow allows
    lo, hi = arr.min(), arr.max()
    if not hi > lo:
        return Image.new("L", img.size, 0)
    if arr.dtype == np.uint16 or arr.dtype.str in ("<u2", ">u2"):
        table = np.clip(np.round((np.arange(65536, dtype=np.float64) - float(lo)) * (255.0 / (float(hi) - float(lo)))), 0, 255)
        return Image.fromarray(table.astype(np.uint8)[arr], mode="L")
    out = np.empty(arr.shape, dtype=np.uint8)
    scale = np.float32(255.0 / (float(hi) - float(lo)))
    for start in range(0, arr.shape[0], 256):  # 256 rows at a time: float32 scratch of 256 x W
        block = (arr[start:start + 256].astype(np.float32) - np.float32(lo)) * scale
        np.rint(block, out=block)
        out[start:start + 256] = block
    return Image.fromarray(out, mode="L")


def shorter_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `size`, with torchvision's rounding of the longer."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def center_offsets(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of a square `size` centre crop of a w x h image, with torchvision's rounding."""
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def resize_shorter_side(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize so the shorter side is `size`, with torchvision's rounding of the longer side."""
    new_size = shorter_side_size(*img.size, size)
    if new_size == img.size:
        return img
    return img.resize(new_size, _INTERPOLATIONS[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Square centre crop with torchvision's rounding of the offsets."""
    left, top = center_offsets(*img.size, size)
    return img.crop((left, top, left + size, top + size))


def resize_and_crop(img: Image.Image, pp: Preprocessing) -> Image.Image:
    """`center_crop(resize_shorter_side(img))` with less resampling: the columns the crop drops (the sides of
    a landscape photo) are never computed. PIL's `box` keeps each output pixel's filter and sample position,
    so values stay within one 8-bit level of the full resize (0.06% of them differ, by rounding). Columns
    only: Pillow's row-wise `box` moves values by up to 13 levels (bicubic, Pillow 13)."""
    w, h = img.size
    s = pp.input_size
    new_w, new_h = shorter_side_size(w, h, pp.resize_size)
    if (new_w, new_h) == (w, h) or pp.interpolation == "nearest":
        # Nothing to resample, or nearest, whose box positions PIL rounds differently (and which is cheap).
        return center_crop(resize_shorter_side(img, pp.resize_size, pp.interpolation), s)
    left, top = center_offsets(new_w, new_h, s)
    sx = w / new_w
    columns = img.resize((s, new_h), _INTERPOLATIONS[pp.interpolation], box=(left * sx, 0, (left + s) * sx, h))
    return columns.crop((0, top, s, top + s))


def eval_pixels(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """RGB PIL image -> uint8 array (input_size, input_size, 3): resized, centre-cropped, not normalised.

    What a model exported with its normalisation inside the graph takes per image (training/export.py):
    a quarter of the bytes of the float32 input to build, stack and copy to a GPU."""
    return np.asarray(resize_and_crop(img, pp), dtype=np.uint8)  # (S, S, 3) uint8


def normalise(pixels: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """uint8 (..., S, S, 3) -> float32 (..., 3, S, S), (p / 255 - mean) / std as one multiply-add per value
    on a transposed view (docs/benchmarks.md: "Resample only the crop, normalise in one pass")."""
    chw = np.moveaxis(pixels, -1, -3)  # (..., 3, S, S) uint8 view
    scale, offset = _normaliser(pp.mean, pp.std)
    x = np.empty(chw.shape, dtype=np.float32)
    np.multiply(chw, scale, out=x)  # (p / 255 - mean) / std  ==  p * scale + offset
    x += offset
    return x  # (..., 3, S, S) float32, C-contiguous


def eval_transform(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """RGB PIL image -> float32 array (3, input_size, input_size), normalised with pp.mean/pp.std: resize the
    shorter side to resize_size, centre-crop input_size (resize_and_crop), normalise."""
    return normalise(eval_pixels(img, pp), pp)


@functools.lru_cache(maxsize=16)
def _normaliser(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 (3, 1, 1) each: p * scale + offset == (p / 255 - mean) / std."""
    m, sd = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    scale, offset = (1.0 / (255.0 * sd)).astype(np.float32), (-m / sd).astype(np.float32)
    return scale.reshape(3, 1, 1), offset.reshape(3, 1, 1)


def normaliser(pp: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) float32 (3, 1, 1): the exact constants `normalise` uses, for graphs that normalise
    themselves (the same float32 multiply-add, so host and graph agree to the last bit)."""
    return _normaliser(pp.mean, pp.std)


def decode(source: ImageSource, pp: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
           max_decode_bytes: int | None = None) -> Image.Image:
    """Bytes or path -> RGB image, as every pipeline that feeds this model decodes it (training's two
    pipelines, validation, export's parity check, evaluation and serving): large JPEGs at pp.draft_size."""
    return load_image(source, max_pixels=max_pixels, draft_size=pp.draft_size, max_decode_bytes=max_decode_bytes)


def full_scale_jpeg(data: bytes, pp: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """True for a JPEG that `decode` would accept and decode at full scale (RGB or grey, within `max_pixels`,
    whole, not large enough for draft decoding), read from its header: what another JPEG decoder may decode in
    `decode`'s place. False for everything else, which only `decode` handles (and explains)."""
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # no end-of-image marker: truncated (or trailing bytes)
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            w, h = img.size
            drafted = pp.draft_size is not None and min(w, h) >= 2 * pp.draft_size  # PIL's draft would halve it
            return w * h <= max_pixels and not drafted and not jpeg_shortfall(img, data)
    except Exception:  # noqa: BLE001 - unreadable header: `decode` says why
        return False


def decode_estimate(data: bytes, pp: Preprocessing) -> int:
    """Peak bytes `decode(data, pp)` will need, read from the header alone (draft scaling included); 0 when
    the header cannot be read (decoding then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format in ("JPEG", "MPO") and pp.draft_size:
                img.draft("RGB", (pp.draft_size, pp.draft_size))
            return decode_bytes(img.mode, img.size)
    except Exception:  # noqa: BLE001 - any unreadable header: the decode reports it properly
        return 0


def preprocess(source: ImageSource, pp: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_decode_bytes: int | None = None) -> np.ndarray:
    """Bytes or path -> float32 (3, input_size, input_size): what the network (PyTorch, and graphs exported
    with float32 input) takes per image."""
    return eval_transform(decode(source, pp, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes), pp)


def preprocess_pixels(source: ImageSource, pp: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
                      max_decode_bytes: int | None = None) -> np.ndarray:
    """Bytes or path -> uint8 (input_size, input_size, 3): resized and cropped, normalised later (in the graph
    of models exported with pixel input, or by `normalise`)."""
    return eval_pixels(decode(source, pp, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes), pp)
