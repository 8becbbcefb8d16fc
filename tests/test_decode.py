import io
import struct
import zlib

import numpy as np
import pytest
from conftest import write_dicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from raybone.data import decode_image, warp_image
from raybone.errors import DataError

RAMP_12_BIT = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (48, 1))  # [48, 64], 0..4095


@pytest.fixture
def grey():
    """An 8-bit radiograph stand-in using the full 0..255 range."""
    rows, cols = np.mgrid[0:40, 0:48]
    pixels = (rows * 255 // 39 + cols * 3) % 256
    pixels[10:20, 10:30] = 255
    pixels[0, 0] = 0
    return pixels.astype(np.uint8)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


# ---------------------------------------------------------------- DICOM


def test_dicom_monochrome2_12_bit_spans_full_uint8_range(tmp_path):
    out = decode_image(write_dicom(tmp_path / "mono2.dcm", RAMP_12_BIT))
    assert out.dtype == np.uint8 and out.shape == (48, 64)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # the ramp stays a ramp
    np.testing.assert_allclose(out[0], RAMP_12_BIT[0].astype(float) * 255 / 4095, atol=1)


def test_dicom_monochrome1_of_inverted_pixels_equals_monochrome2(tmp_path):
    mono2 = decode_image(write_dicom(tmp_path / "mono2.dcm", RAMP_12_BIT))
    mono1 = decode_image(write_dicom(tmp_path / "mono1.dcm", 4095 - RAMP_12_BIT, photometric="MONOCHROME1"))
    assert np.abs(mono1.astype(int) - mono2.astype(int)).max() <= 1


def test_dicom_16_bit_with_rescale_decodes_like_the_12_bit_original(tmp_path):
    stored = RAMP_12_BIT.astype(np.uint32) * 16  # the same ramp in a 16-bit detector's units
    path = write_dicom(tmp_path / "rescaled.dcm", stored, bits_stored=16, rescale=(0.25, -1024))
    reference = decode_image(write_dicom(tmp_path / "mono2.dcm", RAMP_12_BIT))
    assert np.abs(decode_image(path).astype(int) - reference.astype(int)).max() <= 1


def test_dicom_window_maps_centre_to_grey_and_clips_outside(tmp_path):
    out = decode_image(write_dicom(tmp_path / "windowed.dcm", RAMP_12_BIT, window=(2048, 1024)))
    raw = RAMP_12_BIT[0]
    assert np.all(out[0][raw <= 1536] == 0)
    assert np.all(out[0][raw >= 2560] == 255)
    inside = (raw > 1536) & (raw < 2560)
    linear = ((raw[inside] - 2047.5) / 1023 + 0.5) * 255  # DICOM PS3.3 C.11.2.1.2 linear window
    assert np.abs(out[0][inside] - linear).max() <= 1
    assert np.all(np.diff(out[0].astype(int)) >= 0)


def test_dicom_window_applies_after_rescale(tmp_path):
    # Stored 0..4095 with slope 1, intercept -1024 gives -1024..3071; a window at 1024 sits mid-ramp.
    path = write_dicom(tmp_path / "ct-like.dcm", RAMP_12_BIT, rescale=(1, -1024), window=(1024, 1024))
    values = RAMP_12_BIT[0].astype(int) - 1024
    out = decode_image(path)[0]
    assert np.all(out[values <= 512] == 0) and np.all(out[values >= 1536] == 255)


def test_dicom_without_pixel_data_names_the_file(tmp_path):
    path = write_dicom(tmp_path / "header-only.dcm", RAMP_12_BIT, pixel_data="none")
    with pytest.raises(DataError, match=r"header-only\.dcm: .*no pixel data"):
        decode_image(path)


def test_dicom_jpeg2000_garbage_names_a_plugin(tmp_path):
    garbage = encapsulate([b"\xff\x4f\xff\x51 definitely not a codestream" * 4])
    path = write_dicom(tmp_path / "j2k.dcm", RAMP_12_BIT, syntax=JPEG2000Lossless, pixel_data=garbage)
    with pytest.raises(DataError) as caught:
        decode_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "JPEG 2000" in message and "\n" not in message
    assert any(plugin in message for plugin in ("pylibjpeg-openjpeg", "openjpeg", "gdcm"))


def test_text_file_named_dcm_is_rejected(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient notes, not an image\n" * 20)
    with pytest.raises(DataError, match=r"notes\.dcm: not a DICOM file"):
        decode_image(path)


def test_dicom_dimensions_are_checked_before_decoding(tmp_path):
    # The header claims 13000 rows but the pixel data is tiny: the size check must fire first.
    path = write_dicom(tmp_path / "huge.dcm", RAMP_12_BIT[:8, :8], pixel_data=b"\0" * 128)
    from pydicom import dcmread

    ds = dcmread(path)
    ds.Rows = 13000
    ds.save_as(path)
    with pytest.raises(DataError, match=r"huge\.dcm: image is 8x13000 px; larger than 12000"):
        decode_image(path)


# ---------------------------------------------------------------- PNG and JPEG


def test_png_variants_decode_to_the_same_grey(tmp_path, grey):
    palette_order = np.random.default_rng(0).permutation(256).astype(np.uint8)  # index -> grey, shuffled
    indices = np.argsort(palette_order).astype(np.uint8)[grey]
    palette = Image.frombytes("P", grey.shape[::-1], indices.tobytes())
    palette.putpalette(np.repeat(palette_order, 3).tolist())
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(grey[..., None], 255)], axis=2)
    variants = {
        "grey.png": Image.fromarray(grey),
        "palette.png": palette,
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(rgba),
        "grey16.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "grey12in16.png": Image.fromarray(grey.astype(np.uint16) * 16),  # 12-bit detector data in 16-bit PNG
    }
    for name, image in variants.items():
        out = decode_image(_save(image, tmp_path / name))
        assert out.dtype == np.uint8 and out.shape == grey.shape, name
        assert np.abs(out.astype(int) - grey.astype(int)).max() <= 1, name


def test_rgb_becomes_luminance(tmp_path):
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[..., 0] = 255
    out = decode_image(_save(Image.fromarray(red), tmp_path / "red.png"))
    assert abs(int(out.mean()) - 76) <= 1  # ITU-R 601: 0.299 * 255


def test_jpeg_roughly_equals_grey(tmp_path, grey):
    smooth = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))
    out = decode_image(_save(Image.fromarray(smooth), tmp_path / "smooth.jpg", quality=95))
    assert out.shape == smooth.shape and np.abs(out.astype(int) - smooth.astype(int)).mean() < 3


@pytest.mark.parametrize("size", [(1, 1), (7, 100)])
def test_tiny_image_is_rejected(tmp_path, size):
    path = _save(Image.new("L", size), tmp_path / "tiny.png")
    with pytest.raises(DataError, match=rf"tiny\.png: image is {size[0]}x{size[1]} px; too small"):
        decode_image(path)


def test_oversized_png_is_rejected_from_its_header(tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(_png_header_only(13000, 100))  # no pixel data at all: only the header is read
    with pytest.raises(DataError, match=r"wide\.png: image is 13000x100 px; larger than 12000"):
        decode_image(path)


def test_text_file_named_png_is_rejected(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("bone age 12 years\n")
    with pytest.raises(DataError, match=r"notes\.png: not a readable"):
        decode_image(path)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: file is empty"):
        decode_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_rejected(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, size=(128, 128), dtype=np.uint8)
    whole = io.BytesIO()
    Image.fromarray(noise).save(whole, format="PNG" if suffix == ".png" else "JPEG")
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(DataError, match=rf"cut\{suffix}: "):
        decode_image(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"absent\.png: cannot read"):
        decode_image(tmp_path / "absent.png")


def test_warp_ignores_aspect_ratio(grey):
    out = warp_image(grey, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + end
