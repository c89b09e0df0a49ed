"""The contact sheet of a tune's render: an 8x8 grid, one row per style, its name on the left."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

THUMB_PX = 128
LABEL_PX = 160
PAD_PX = 4


def contact_sheet(rows: Sequence[tuple[str, Sequence[Image.Image | None]]]) -> Image.Image:
    """`rows`: (style name, images); a missing (not delivered) image is drawn as a grey tile."""
    columns = max((len(images) for _, images in rows), default=0)
    width = LABEL_PX + columns * (THUMB_PX + PAD_PX) + PAD_PX
    height = len(rows) * (THUMB_PX + PAD_PX) + PAD_PX
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (name, images) in enumerate(rows):
        top = PAD_PX + r * (THUMB_PX + PAD_PX)
        draw.text((PAD_PX, top + THUMB_PX // 2 - 6), name[:24], fill=(0, 0, 0))
        for c, image in enumerate(images):
            left = LABEL_PX + PAD_PX + c * (THUMB_PX + PAD_PX)
            if image is None:
                draw.rectangle((left, top, left + THUMB_PX, top + THUMB_PX), fill=(200, 200, 200))
                continue
            thumb = image.convert("RGB").resize((THUMB_PX, THUMB_PX))
            sheet.paste(thumb, (left, top))
    return sheet
