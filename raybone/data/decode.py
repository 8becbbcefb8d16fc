"""Decode one radiograph file (PNG, JPEG or DICOM) into a full-resolution 8-bit grey image.

Every failure is a DataError "<path>: <problem>" so prepare() can skip the file and say why.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from raybone.errors import DataError

MAX_SIDE = 12000
MIN_SIDE = 8
DICOM_SUFFIXES = (".dcm", ".dicom")
_PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def decode_image(path) -> np.ndarray:
    """Read a radiograph and return it as a 2-D uint8 grey array at full resolution."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror or err})") from err
    return decode_bytes(data, path)


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
    if width < MIN_SIDE or height < MIN_SIDE:
        raise DataError(f"{path}: image is {width}x{height} px; too small")


# ---------------------------------------------------------------- PNG / JPEG


def _decode_raster(data: bytes, path: Path) -> np.ndarray:
    image = _open_raster(data, path)
    _check_dimensions(*image.size, path)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: truncated or corrupt {image.format} data ({_one_line(err)})") from err
    return _raster_to_grey(image)


def _open_raster(data: bytes, path: Path) -> Image.Image:
    # Image.open only parses the header, so dimensions are checked before any pixel is decoded.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: image is larger than {MAX_SIDE} px on a side") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable PNG, JPEG or DICOM image") from err


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
    scaled = pixels.astype(np.float64) * (255.0 / (2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, path: Path) -> np.ndarray:
    dataset = _read_dicom_header(data, path)
    _check_dicom_pixels_present(dataset, path)
    _check_dimensions(int(dataset.Columns), int(dataset.Rows), path)
    pixels = _dicom_pixels(dataset, path)
    try:
        pixels = apply_modality_lut(pixels, dataset)
        pixels = apply_voi_lut(pixels, dataset)
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: invalid DICOM modality/VOI LUT ({_one_line(err)})") from err
    grey = _scale_to_uint8(np.asarray(pixels, dtype=np.float64))
    # MONOCHROME1 shows bone dark; invert so every source has bone bright like MONOCHROME2.
    if dataset.get("PhotometricInterpretation", "") == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _read_dicom_header(data: bytes, path: Path) -> pydicom.Dataset:
    try:
        # force=True also accepts old files without the 128-byte preamble and "DICM" marker.
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a readable DICOM file ({_one_line(err)})") from err
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
        # index=0: a multi-frame file contributes its first frame only.
        pixels = pixel_array(dataset, index=0)
    except Exception as err:  # plugins raise anything from ValueError to RuntimeError on bad data
        tried = ", ".join(decoder.available_plugins) or "none"
        hint = _install_hint(decoder)
        extra = f"; the data may be corrupt, or {hint}" if hint else "; the data may be corrupt"
        raise DataError(
            f"{path}: cannot decode {syntax.name} pixel data with plugin(s) {tried} ({_one_line(err)}){extra}"
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


def _one_line(err: Exception) -> str:
    """Plugin errors span lines; DataError messages must not."""
    return " ".join(str(err).split())


def _rgb_luminance(pixels: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114])
    return pixels[..., :3].astype(np.float64) @ weights
