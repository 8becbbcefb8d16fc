"""Data preparation: read labelled hand radiographs once into a compact, verified artifact."""

from raybone.data.decode import decode_image, warp_image
from raybone.data.phantom import render_hand, write_phantom_atlas
from raybone.data.prepare import PreparedData, load_prepared, prepare, same_data

__all__ = [
    "PreparedData",
    "decode_image",
    "load_prepared",
    "prepare",
    "render_hand",
    "same_data",
    "warp_image",
    "write_phantom_atlas",
]
