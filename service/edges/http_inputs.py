"""Turning an HTTP request into image bytes and options, with a 4xx `RequestError` for every way it can be wrong.

No model and no BentoML here: only Starlette's request object and its multipart parser, so the limits
(bytes per image, images per request, fields per form) are enforced before anything is decoded.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from tuneserve.service.engine.engine import ImageInput
from tuneserve.service.engine.errors import RequestError, too_large

# Multipart framing (boundaries, part headers) on top of the images themselves.
MULTIPART_OVERHEAD_PER_PART = 16 * 1024
MAX_TEXT_FIELDS = 16  # top_k and a few client extras; more is a malformed or hostile form


async def read_body(request: Request, limit: int, setting: str, timeout_s: float) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed `limit`, without reading the rest, and
    (408) when it has not all arrived within `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large("the request body", declared, limit, setting)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():  # also covers chunked uploads, which declare no length
            size += len(chunk)
            if size > limit:
                raise too_large("the request body", f"more than {limit}", limit, setting)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        # The HTTP protocol closes a connection answered 408 at once, without reading the rest of the body.
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s (server setting "
                             "TUNESERVE_BODY_TIMEOUT_S); send it faster, or in smaller requests",
                        {"Connection": "close"}) from None


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_form(
    request: Request, body: bytes, max_files: int, too_many: RequestError
) -> tuple[list[ImageInput], dict[str, str]]:
    """Parse an already size-checked multipart body: (file parts in order, text fields).
    More than `max_files` file parts raises `too_many`."""

    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=max_files, max_fields=MAX_TEXT_FIELDS)
    parser.spool_max_size = len(body) + 1  # the body is in memory already: keep the parts there too
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "too many files" in str(e).lower():
            raise too_many from None
        raise RequestError(400, f"malformed multipart/form-data request: {e}") from None
    files: list[ImageInput] = []
    fields: dict[str, str] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append(ImageInput(value.filename or key, await value.read()))
            else:
                fields[key] = value
    finally:
        await form.close()
    return files, fields


def parse_top_k(raw: str | None, default: int, num_classes: int) -> int:
    """top_k from a query parameter or form field: an integer >= 1; above the number of classes it is
    clamped to that number (asking for "all of them" with a big k is legitimate, not an error)."""
    if raw is None or raw.strip() == "":
        return min(default, num_classes)
    try:
        k = int(raw.strip())
    except ValueError:
        raise RequestError(400, f"top_k={raw!r} is not an integer; send an integer >= 1 (default {default})") from None
    if k < 1:
        raise RequestError(400, f"top_k={k} is out of range; send an integer >= 1 (the model has {num_classes} classes)")
    return min(k, num_classes)
