"""Input images: bounded bytes and pixels, PNG/JPEG/WebP only, decompression bombs refused."""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import warnings
from dataclasses import dataclass
from typing import Final

from PIL import Image
from sqlalchemy import Connection, insert, select

from billing.clock import utcnow
from orchestrator.errors import OrchestratorError
from orchestrator.storage import Storage
from orchestrator.tables import images

IMAGE_BYTES_MAX: Final = 20 * 1024 * 1024
IMAGE_SIDE_MAX_PX: Final = 4096
IMAGE_PIXELS_MAX: Final = IMAGE_SIDE_MAX_PX * IMAGE_SIDE_MAX_PX
FORMATS: Final = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


class InvalidImage(OrchestratorError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UnknownImage(OrchestratorError):
    pass


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    format: str
    width: int
    height: int


def check_image(data: bytes, field: str = "image") -> CheckedImage:
    if not data:
        raise InvalidImage(field, "is empty")
    if len(data) > IMAGE_BYTES_MAX:
        raise InvalidImage(field, f"is {len(data)} bytes; at most {IMAGE_BYTES_MAX} allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
                if fmt not in FORMATS:
                    raise InvalidImage(field, f"format {fmt} not allowed; use PNG, JPEG or WebP")
                # Check the header's size before decoding a single pixel.
                if width * height > IMAGE_PIXELS_MAX or max(width, height) > IMAGE_SIDE_MAX_PX:
                    raise InvalidImage(
                        field, f"is {width}x{height}; at most {IMAGE_SIDE_MAX_PX}px a side"
                    )
                img.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(field, f"refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise InvalidImage(field, f"is not a readable PNG, JPEG or WebP image ({exc})") from exc
    return CheckedImage(data, fmt, width, height)


def decode_b64(text: str, field: str = "image_b64") -> bytes:
    if len(text) > IMAGE_BYTES_MAX * 4 // 3 + 4:
        raise InvalidImage(field, f"is larger than {IMAGE_BYTES_MAX} bytes")
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(field, "is not valid base64") from exc


def store_image(
    conn: Connection, storage: Storage, account_id: str, data: bytes, field: str = "image"
) -> str:
    checked = check_image(data, field)
    image_id = "img_" + secrets.token_hex(12)
    key = f"inputs/{account_id}/{image_id}.{FORMATS[checked.format]}"
    storage.put(key, data)
    conn.execute(
        insert(images).values(
            id=image_id,
            account_id=account_id,
            path=key,
            format=checked.format,
            width=checked.width,
            height=checked.height,
            bytes=len(data),
            created_at=utcnow(),
        )
    )
    return image_id


def image_key(conn: Connection, account_id: str, image_id: str) -> str:
    """The storage key of an account's own image; another account's image is unknown."""
    found = conn.execute(
        select(images.c.path, images.c.deleted_at).where(
            images.c.id == image_id, images.c.account_id == account_id
        )
    ).first()
    if found is None:
        raise UnknownImage(f"image_id: no image {image_id!r}")
    if found.deleted_at is not None:
        raise UnknownImage(f"image_id: image {image_id!r} was deleted after the retention period")
    return str(found.path)
