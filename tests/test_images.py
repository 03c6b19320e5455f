"""Reading a user's photos: every PIL mode comes out as the RGB a viewer shows, pixel for pixel, and photos much
smaller than the training resolution are warned about."""

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from tea_lightning.images import load_square_images, read_image, to_rgb

WHITE, RED, BLUE = [255, 255, 255], [255, 0, 0], [0, 0, 255]


def png16(path, pixels: np.ndarray, color_type: int) -> None:
    """Write a 16-bit PNG by hand (PIL cannot write 16-bit colour): 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0,
                                                                      0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def rgb(path) -> list:
    return np.asarray(read_image(path)).tolist()


def test_a_16_bit_greyscale_png_keeps_its_greys_instead_of_turning_white(tmp_path):
    png16(tmp_path / "grey16.png", np.array([[0, 65535], [32896, 257 * 10]], np.uint16), color_type=0)
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert rgb(tmp_path / "grey16.png") == [[[0, 0, 0], WHITE], [[128, 128, 128], [10, 10, 10]]]


def test_16_bit_colour_and_alpha_pngs_come_out_as_8_bit_with_transparency_on_white(tmp_path):
    colour = np.zeros((1, 3, 3), np.uint16)
    colour[0, 0], colour[0, 1], colour[0, 2] = (65535, 0, 0), (0, 32896, 0), (0, 0, 2570)
    png16(tmp_path / "rgb16.png", colour, color_type=2)
    assert rgb(tmp_path / "rgb16.png") == [[RED, [0, 128, 0], [0, 0, 10]]]
    grey_alpha = np.array([[[0, 65535], [0, 0]]], np.uint16)  # a black pixel, then a transparent one
    png16(tmp_path / "la16.png", grey_alpha, color_type=4)
    assert rgb(tmp_path / "la16.png") == [[[0, 0, 0], WHITE]]
    rgba = np.array([[[65535, 0, 0, 65535], [0, 0, 65535, 0]]], np.uint16)
    png16(tmp_path / "rgba16.png", rgba, color_type=6)
    assert rgb(tmp_path / "rgba16.png") == [[RED, WHITE]]


@pytest.mark.parametrize(("mode", "make", "expected"), [
    ("1", lambda: Image.frombytes("1", (2, 1), bytes([0b01000000])), [[[0, 0, 0], WHITE]]),
    ("L", lambda: Image.fromarray(np.array([[0, 200]], np.uint8)), [[[0, 0, 0], [200, 200, 200]]]),
    ("LA", lambda: Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA"), [[[50, 50, 50], WHITE]]),
    ("RGBA", lambda: Image.fromarray(np.array([[[0, 0, 255, 255], [0, 0, 255, 0]]], np.uint8), "RGBA"),
     [[BLUE, WHITE]]),
    ("CMYK", lambda: Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 0, 0]]], np.uint8), "CMYK"),
     [[[0, 255, 255], WHITE]]),
])
def test_every_mode_converts_as_a_viewer_shows_it(mode, make, expected, tmp_path):
    image = make()
    assert image.mode == mode
    path = tmp_path / f"image.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "CMYK":  # JPEG carries CMYK; lossy, so compare a solid image
        image = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
        image.save(path, quality=100)
        assert Image.open(path).mode == "CMYK"
        assert np.abs(np.asarray(read_image(path)).astype(int) - [0, 255, 255]).max() <= 2
    else:
        image.save(path)
        assert Image.open(path).mode == mode
        assert rgb(path) == expected


def test_32_bit_greyscale_holding_16_bit_data_is_scaled_like_16_bit():
    # Older Pillow versions open 16-bit greyscale PNGs in mode "I".
    image = Image.fromarray(np.array([[0, 65535, 32896]], np.int32), "I")
    assert np.asarray(to_rgb(image)).tolist() == [[[0, 0, 0], WHITE, [128, 128, 128]]]


def test_a_palette_image_with_a_transparent_index_shows_white_there(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "palette.png", transparency=1)
    image.save(tmp_path / "opaque.png")
    assert rgb(tmp_path / "palette.png") == [[RED, WHITE]]
    assert rgb(tmp_path / "opaque.png") == [[RED, BLUE]]


def test_photos_much_smaller_than_the_resolution_are_warned_about_by_name(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "big.png")
    Image.new("RGB", (20, 24), "red").save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match=r"1 of 2 images .* much smaller than data.resolution=64 .*tiny.png, is 20x24"):
        load_square_images(tmp_path, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_square_images(tmp_path, 40)  # 20 px is half of 40: enlarged 2x, not warned
