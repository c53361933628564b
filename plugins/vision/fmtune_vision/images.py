"""Image references: what a record's image field may hold, checked without decoding, and decoded
only when a batch needs it.

A record's image field holds one image or a list: a file path (absolute, or relative to the
current folder or to the data file's folder), ``bytes``, a ``data:image/...;base64,`` URL, or a
``{"bytes": ..., "path": ...}`` mapping (a ``datasets.Image`` value as parquet/arrow store it;
``bytes`` may be base64 text in JSON). The prepared rows keep *references* (strings): an
absolute path, a data URL for bytes that came from a JSON file, or ``dataset:SPLIT:ROW:K`` for
bytes in a parquet/arrow file (read from that memory-mapped file when the batch is built). No
image is kept decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

DATASET_REF = "dataset:"


class ImageProblem(ValueError):
    """An image reference that cannot be used (the message names what is wrong)."""


def as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageProblem("'bytes' is text but not base64") from None


def resolve(value: Any, data_file: str) -> tuple[str | None, bytes | None]:
    """``(absolute path, None)`` or ``(None, bytes)`` for one image value; an
    :class:`ImageProblem` when it is neither."""
    if isinstance(value, dict):
        raw = value.get("bytes")
        if raw is not None:
            return None, _b64(raw) if isinstance(raw, str) else bytes(raw)
        value = value.get("path")
        if value is None:
            raise ImageProblem("an image mapping needs 'bytes' or 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None, bytes(value)
    if not isinstance(value, str) or not value:
        raise ImageProblem(f"expected a path, bytes or a data URL, got {type(value).__name__}")
    if value.startswith("data:"):
        head, _, payload = value.partition(",")
        if ";base64" not in head:
            raise ImageProblem("a data URL must be base64 (data:image/png;base64,...)")
        return None, _b64(payload)
    if value.startswith(("http://", "https://")):
        raise ImageProblem(f"{value}: URLs are not fetched (fmtune reads local files only)")
    for candidate in (value, os.path.join(os.path.dirname(os.path.abspath(data_file)), value)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate), None
    raise ImageProblem(f"{value}: image file not found")


def check(path: str | None, data: bytes | None) -> tuple[int, int]:
    """``(height, width)`` of an image read from its header after checking the whole file
    (PIL's ``verify``, which does not decode pixels); :class:`ImageProblem` when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path if path is not None else io.BytesIO(data)) as img:
            width, height = img.size
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        what = path if path is not None else "the image bytes"
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ImageProblem(f"{what}: not a readable image ({reason})") from None
    return height, width


def reference(path: str | None, data: bytes | None, dataset_ref: str | None) -> str:
    """The string a prepared row keeps for one checked image."""
    if path is not None:
        return path
    if dataset_ref is not None:
        return dataset_ref
    return "data:image;base64," + base64.b64encode(data or b"").decode("ascii")


def load(ref: str, sources: dict[str, Any] | None = None):
    """The decoded RGB image of a reference (:func:`reference`)."""
    from PIL import Image

    if ref.startswith(DATASET_REF):
        _, split, row, column, k = ref.split(":", 4)
        value = as_list((sources or {})[split][int(row)][column])[int(k)]
        path, data = resolve(value, "")
        src: Any = path if path is not None else io.BytesIO(data)
    elif ref.startswith("data:"):
        src = io.BytesIO(base64.b64decode(ref.partition(",")[2]))
    else:
        src = ref
    with Image.open(src) as img:
        return img.convert("RGB")
