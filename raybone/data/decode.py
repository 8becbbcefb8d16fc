"""Decode one radiograph file (PNG, JPEG or DICOM) into a full-resolution 8-bit grey image.

Every failure is a DataError "<path>: <problem>" so prepare() can skip the file and say why.

Memory is bounded before any pixel is decoded: a file must be a regular file of at most MAX_FILE_BYTES; an
image at most MAX_SIDE px on a side and MAX_PIXELS pixels (from the PNG/JPEG header, or DICOM Rows x Columns,
checked before a deflated DICOM is inflated beyond MAX_FILE_BYTES); and all the decodes running at once, on
however many threads, hold at most DECODE_MEMORY bytes between them (each reserves its file and an estimate of
its decoded pixels first).
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from raybone.errors import DataError, one_line
from raybone.files import read_regular_file, regular_file_size

MAX_SIDE = 12000
MIN_SIDE = 8
MAX_PIXELS = 30_000_000  # 30 megapixels: a 43 cm detector at 80 um is 29 MP
MAX_FILE_BYTES = 256 * 2**20
DECODE_MEMORY = 1024 * 2**20  # what all concurrent decodes may hold at once
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)  # preference order when one id has several files
# Image files raybone does not read: reported where found, never skipped silently.
UNSUPPORTED_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".j2k", ".heic", ".avif")
RASTER_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: Pillow's name for a JPEG with extra (e.g. preview) frames
# Peak bytes per decoded pixel beyond the file itself (measured on 30-megapixel files: 16-bit DICOM with
# rescale and window 28.8, 16-bit PNG 9.0, RGB JPEG 7.0): pydicom's LUTs work in float64.
_DICOM_BYTES_PER_PIXEL = 30
_RASTER_BYTES_PER_PIXEL = 10
_HEADER_BYTES = 1 << 20  # headers are read from the first MiB; a file whose header lies beyond is costed at most
_PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def decode_image(path) -> np.ndarray:
    """Read a radiograph and return it as a 2-D uint8 grey array at full resolution."""
    return read_radiograph(path)[0]


def read_radiograph(path) -> tuple[np.ndarray, str]:
    """(2-D uint8 grey array at full resolution, sha256 of the file), within the decode memory budget."""
    path = Path(path)
    size = regular_file_size(path, MAX_FILE_BYTES, DataError)
    with _memory.hold(size + _decoded_bytes(path)):
        data = read_regular_file(path, MAX_FILE_BYTES, DataError)
        return decode_bytes(data, path), hashlib.sha256(data).hexdigest()


def decode_bytes(data: bytes, path: Path) -> np.ndarray:
    """Decode the bytes of a radiograph file; `path` names it in errors and picks DICOM by suffix."""
    if not data:
        raise DataError(f"{path}: file is empty (0 bytes)")
    if _looks_like_dicom(data, path):
        return _decode_dicom(data, path)
    return _decode_raster(data, path)


def warp_image(grey: np.ndarray, image_size: int) -> np.ndarray:
    """Resize to image_size x image_size without keeping the aspect ratio, as Chen's pipeline does."""
    # Pillow's bilinear filter widens with the scale factor, so shrinking averages like an area filter;
    # reducing_gap first box-reduces huge scans by an integer factor for speed.
    resized = Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def _looks_like_dicom(data: bytes, path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM"


def _check_dimensions(width: int, height: int, path: Path) -> None:
    if width > MAX_SIDE or height > MAX_SIDE:
        raise DataError(f"{path}: image is {width}x{height} px; larger than {MAX_SIDE} px on a side")
    if width * height > MAX_PIXELS:
        raise DataError(
            f"{path}: image is {width}x{height} px ({width * height / 1e6:.0f} megapixels); larger than "
            f"the {MAX_PIXELS / 1e6:.0f}-megapixel limit"
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise DataError(f"{path}: image is {width}x{height} px; too small")


# ---------------------------------------------------------------- memory


class _MemoryBudget:
    """Bytes that concurrent decodes hold; a decode waits until its share fits (a share above the whole budget
    waits until it runs alone)."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        amount = min(amount, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self.used + amount <= self.total)
            self.used += amount
        try:
            yield
        finally:
            with self._changed:
                self.used -= amount
                self._changed.notify_all()


_memory = _MemoryBudget(DECODE_MEMORY)


def _decoded_bytes(path: Path) -> int:
    """An upper estimate of the memory decoding `path` takes beyond its bytes, from its header alone."""
    worst = DECODE_MEMORY
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_BYTES)
    except OSError:
        return 0  # reading it again will say why
    try:
        if _looks_like_dicom(head, path):
            if _is_deflated(head):
                return worst  # its header is inside the deflated stream, which pydicom would inflate whole
            header = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, force=True)
            pixels, per_pixel = int(header.Rows) * int(header.Columns), _DICOM_BYTES_PER_PIXEL
        else:
            with Image.open(io.BytesIO(head)) as image:
                pixels, per_pixel = image.size[0] * image.size[1], _RASTER_BYTES_PER_PIXEL
    except Exception:  # a header beyond the first MiB, or no header at all: cost it as the largest image
        return worst
    return 0 if pixels > MAX_PIXELS else pixels * per_pixel  # too large: refused before its pixels are decoded


# ---------------------------------------------------------------- PNG / JPEG


def _decode_raster(data: bytes, path: Path) -> np.ndarray:
    image = _open_raster(data, path)
    _check_dimensions(*image.size, path)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: truncated or corrupt {image.format} data ({one_line(err)})") from err
    return _raster_to_grey(image)


def _open_raster(data: bytes, path: Path) -> Image.Image:
    # Image.open only parses the header, so dimensions are checked before any pixel is decoded.
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours: say how large it claims to be
        size = _claimed_size(data)
        if size:
            _check_dimensions(*size, path)
        raise DataError(f"{path}: image is larger than the {MAX_PIXELS / 1e6:.0f}-megapixel limit") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable PNG, JPEG or DICOM image") from err
    if image.format not in RASTER_FORMATS:
        raise DataError(f"{path}: {image.format} image; raybone reads PNG, JPEG and DICOM")
    return image


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG or JPEG header, read by the format's own parser (which skips Pillow's check)."""
    for parser in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile):
        try:
            return parser(io.BytesIO(data)).size
        except (SyntaxError, OSError, ValueError):
            continue
    return None


def _raster_to_grey(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _scale_by_bit_depth(np.asarray(image))
    if image.mode == "F":
        return _scale_to_uint8(np.asarray(image, dtype=np.float64))
    # PIL's "L" conversion is ITU-R 601 luminance for RGB(A) and resolves palettes first.
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _scale_by_bit_depth(pixels: np.ndarray) -> np.ndarray:
    # A 16-bit PNG often holds 10- or 12-bit detector data; dividing by 65535 would leave it near black,
    # so scale by the smallest bit depth that holds the brightest pixel.
    if pixels.min() < 0:
        return _scale_to_uint8(pixels.astype(np.float64))
    bits = max(8, int(pixels.max()).bit_length())
    # Integer arithmetic rounds exactly as rint(p * 255 / top) (the odd top never leaves a half), in a quarter of
    # float64's memory.
    top = 2**bits - 1
    scaled = pixels.astype(np.uint32 if bits <= 24 else np.uint64)
    scaled *= 255
    scaled += top // 2
    scaled //= top
    return scaled.astype(np.uint8)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = values - low  # one float copy, scaled in place
    scaled *= 255.0 / (high - low)
    np.rint(scaled, out=scaled)
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


# ---------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, path: Path) -> np.ndarray:
    _check_inflated_size(data, path)
    dataset = _read_dicom_header(data, path)
    _check_dicom_pixels_present(dataset, path)
    _check_dimensions(int(dataset.Columns), int(dataset.Rows), path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:  # a hand radiograph is one frame; which of several is the radiograph cannot be guessed
        raise DataError(f"{path}: DICOM holds {frames} frames; raybone reads single-frame radiographs")
    pixels = _dicom_pixels(dataset, path)
    for tag in _PIXEL_DATA_TAGS:  # decoded: the LUTs need the attributes only, not the pixel bytes
        dataset.pop(tag, None)
    try:
        pixels = apply_modality_lut(pixels, dataset)
        pixels = apply_voi_lut(pixels, dataset)
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: invalid DICOM modality/VOI LUT ({one_line(err)})") from err
    grey = _scale_to_uint8(np.asarray(pixels, dtype=np.float64))
    # MONOCHROME1 shows bone dark; invert so every source has bone bright like MONOCHROME2.
    if dataset.get("PhotometricInterpretation", "") == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _check_inflated_size(data: bytes, path: Path) -> None:
    """pydicom inflates a deflated DICOM whole: first inflate it piecewise, counting, and refuse a bomb."""
    if not _is_deflated(data):
        return
    # The file meta group starts with its own length (0002,0000) UL; the deflated dataset follows the group.
    if data[132:138] != b"\x02\x00\x00\x00UL":
        raise DataError(f"{path}: deflated DICOM without a file meta group length")
    pending = data[144 + int.from_bytes(data[140:144], "little") :]
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while pending and total <= MAX_FILE_BYTES:
            total += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
    except zlib.error as err:
        raise DataError(f"{path}: corrupt deflated DICOM data ({one_line(err)})") from None
    if total > MAX_FILE_BYTES:
        raise DataError(f"{path}: deflated DICOM inflates to more than {MAX_FILE_BYTES / 2**20:.0f} MiB")


def _is_deflated(data: bytes) -> bool:
    """Whether a DICOM file's meta group names the deflated transfer syntax."""
    return data[128:132] == b"DICM" and pydicom.uid.DeflatedExplicitVRLittleEndian.encode() in data[132:4096]


def _read_dicom_header(data: bytes, path: Path) -> pydicom.Dataset:
    try:
        # force=True also accepts old files without the 128-byte preamble and "DICM" marker.
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a readable DICOM file ({one_line(err)})") from err
    if data[128:132] != b"DICM" and "Rows" not in dataset:
        raise DataError(f"{path}: not a DICOM file (no DICM marker and no image attributes)")
    return dataset


def _check_dicom_pixels_present(dataset: pydicom.Dataset, path: Path) -> None:
    if not any(tag in dataset for tag in _PIXEL_DATA_TAGS):
        raise DataError(f"{path}: DICOM file has no pixel data")
    if "Rows" not in dataset or "Columns" not in dataset:
        raise DataError(f"{path}: DICOM file lacks Rows/Columns, so its pixels cannot be read")


def _dicom_pixels(dataset: pydicom.Dataset, path: Path) -> np.ndarray:
    syntax = _transfer_syntax(dataset)
    decoder = _decoder_for(syntax, path)
    try:
        pixels = pixel_array(dataset, index=0)  # the only frame: multi-frame files are refused before
    except Exception as err:  # plugins raise anything from ValueError to RuntimeError on bad data
        tried = ", ".join(decoder.available_plugins) or "none"
        hint = _install_hint(decoder)
        extra = f"; the data may be corrupt, or {hint}" if hint else "; the data may be corrupt"
        # Plugins name the in-memory frame they were given (<_io.BytesIO object at 0x...>): say what it is.
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(the frame's data)", one_line(err))
        raise DataError(
            f"{path}: cannot decode {syntax.name} pixel data with plugin(s) {tried} ({reason}){extra}"
        ) from err
    if pixels.ndim == 3:
        pixels = _rgb_luminance(pixels)
    return pixels


def _transfer_syntax(dataset: pydicom.Dataset) -> pydicom.uid.UID:
    if getattr(dataset, "file_meta", None) is None:
        dataset.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in dataset.file_meta:
        # Files without a meta header are almost always raw implicit-VR little endian.
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.UID(dataset.file_meta.TransferSyntaxUID)


def _decoder_for(syntax: pydicom.uid.UID, path: Path):
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise DataError(f"{path}: transfer syntax {syntax.name} ({syntax}) is not supported") from err
    if not decoder.is_available:
        raise DataError(f"{path}: {syntax.name} compressed; {_install_hint(decoder)}")
    return decoder


def _install_hint(decoder) -> str:
    # pydicom lists each missing plugin as "name - requires pkg>=x and pkg>=y".
    options = [entry.split(" - requires ", 1)[-1] for entry in decoder.missing_dependencies]
    return f"install {' or '.join(options)}" if options else ""


def _rgb_luminance(pixels: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114])
    return pixels[..., :3].astype(np.float64) @ weights
