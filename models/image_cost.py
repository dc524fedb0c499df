"""What decoding an image will cost, known from its header before any pixel is decoded.

A 77 KB PNG can declare 40 million 16-bit pixels; a 100 KB JPEG can claim 6300x6300 and leave libjpeg to
fill the missing rows with grey, without an error. `load_image` refuses both before decoding: the first
when the memory its decode needs is over a limit, the second when its compressed data is shorter than the
image it claims could possibly be.
"""
from __future__ import annotations

import math

from PIL import Image

# Bytes per pixel of the decoded image plus what load_image's conversion to 8-bit RGB allocates beside it
# (models/preprocessing._to_rgb), by the mode Pillow decodes into.
_BYTES_PER_PIXEL = {
    "1": 3.2, "L": 4, "P": 8, "RGB": 3, "YCbCr": 6, "LAB": 6, "HSV": 6,
    "LA": 9, "La": 9, "PA": 9, "RGBA": 7, "RGBa": 7, "RGBX": 7, "CMYK": 7,
    "I;16": 6, "I;16L": 6, "I;16B": 6, "I;16N": 6, "I": 8, "F": 8,
}
_DEFAULT_BYTES_PER_PIXEL = 9  # any other mode: assume the costliest conversion

# Start-of-frame markers of arithmetic-coded JPEGs (SOF9-11, SOF13-15): they can code an 8x8 block in under a
# bit, so the Huffman bound below does not apply to them.
_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def decode_bytes(mode: str, size: tuple[int, int]) -> int:
    """Peak bytes to decode a `size` image of `mode` and convert it to RGB."""
    return math.ceil(size[0] * size[1] * _BYTES_PER_PIXEL.get(mode, _DEFAULT_BYTES_PER_PIXEL))


def jpeg_shortfall(img: Image.Image, data: bytes) -> str | None:
    """Why a JPEG's data cannot hold the image its header declares, or None.

    Huffman coding spends at least one bit per code, and every 8x8 block of every component needs a DC code
    and an end-of-block code in a sequential JPEG (2 bits), or a DC code in a progressive one (1 bit): fewer
    bytes after the header than that bound mean the file was cut short or its size was forged. A hard lower
    bound: no real JPEG comes near it (a flat grey baseline image at quality 90 has ~6 bits a block)."""
    if not getattr(img, "layer", None) or not img.tile or _arithmetic_coded(data, img.tile[0].offset):
        return None
    width, height = img.size
    h_max = max(h for _, h, _, _ in img.layer)
    v_max = max(v for _, _, v, _ in img.layer)
    blocks = sum(math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
                 for _, h, v, _ in img.layer)
    min_bytes = math.ceil(blocks * (1 if img.info.get("progressive") else 2) / 8)
    coded = len(data) - img.tile[0].offset
    if coded >= min_bytes:
        return None
    return (f"truncated JPEG: its header declares {width}x{height} pixels, which need at least {min_bytes} bytes "
            f"of image data, but only {max(coded, 0)} follow the header")


def _arithmetic_coded(data: bytes, header_end: int) -> bool:
    """Walk the marker segments before the image data, looking for an arithmetic-coding start of frame."""
    i = 2  # after SOI
    while i + 4 <= min(header_end, len(data)):
        if data[i] != 0xFF:
            return False  # not a marker where one should be: let the decoder judge the file
        marker = data[i + 1]
        if marker in _ARITHMETIC_SOF:
            return True
        if marker == 0xDA:  # start of scan: the header is over
            return False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False
