"""Image grids a person reads: a labelled row per prompt, a column per setting, small images grown pixel for pixel."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

THUMBNAIL = 256  # grid cells are at most this many pixels wide
SMALL_CELL = 96  # and small images grow to at least this many
GAP = 10  # pixels between the grid's rows and between its settings


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken between words."""
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def table(cells: Sequence[Sequence[Sequence[Image.Image]]], rows: Sequence[str], columns: Sequence[str],
          cell: int = THUMBNAIL) -> Image.Image:
    """Images laid out as a table: one row per prompt (labelled on the left), one column per setting (headed on
    top); `cells[r][c]` are the images of prompt r under setting c, side by side.

    Large images shrink to `cell` pixels; small ones (the 32 px `mini` world) grow, pixel for pixel, to at least
    `SMALL_CELL`, so that a person can see what they show."""
    images = [image for row in cells for column in row for image in column]
    size = min(cell, max(SMALL_CELL, max(image.width for image in images)))
    per_cell = max(len(column) for row in cells for column in row)
    font = _font(14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_lines = [_wrap(text, 28) for text in rows]
    left = 12 + max(int(measure.textlength(line, font=font)) for lines in label_lines for line in lines)
    widths = [max(per_cell * (size + 2) - 2, int(measure.textlength(header, font=font)) + 4) for header in columns]
    starts = [left + sum(widths[:c]) + GAP * c for c in range(len(columns))]
    top = 26
    grid = Image.new("RGB", (starts[-1] + widths[-1] + GAP, top + len(rows) * (size + GAP)), "white")
    draw = ImageDraw.Draw(grid)
    for x, header in zip(starts, columns, strict=True):
        draw.text((x, 5), header, fill="black", font=font)
    for r, (row, lines) in enumerate(zip(cells, label_lines, strict=True)):
        y = top + r * (size + GAP)
        for k, line in enumerate(lines):
            draw.text((6, y + max(0, size // 2 - 9 * len(lines)) + 18 * k), line, fill="black", font=font)
        for x, column in zip(starts, row, strict=True):
            for i, image in enumerate(column):
                resample = Image.Resampling.NEAREST if image.width < size else Image.Resampling.BICUBIC
                grid.paste(image.convert("RGB").resize((size, size), resample), (x + i * (size + 2), y))
    return grid
