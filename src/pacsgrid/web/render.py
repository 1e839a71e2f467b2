"""Rendered images and thumbnails (PS3.18 9.5, 10.4.1.1.3): a frame as JPEG or PNG.

Pixel data is decoded by pydicom (with the pylibjpeg plugins for JPEG, JPEG-LS, JPEG 2000 and
RLE), the Modality LUT (rescale) and the VOI LUT or window applied, MONOCHROME1 inverted,
palette colour expanded, then scaled to the requested viewport with Pillow.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from pacsgrid.dicomfile.transcode import pixel_array


class RenderError(Exception):
    """The object has no image pydicom can decode (no pixel data, unsupported encoding)."""


def render(
    part10: bytes,
    frame: int = 1,
    *,
    media: str = "image/jpeg",
    viewport: tuple[int, int] | None = None,
    window: tuple[float, float] | None = None,
    quality: int = 90,
) -> bytes:
    import pydicom
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(part10), force=True)
            if "PixelData" not in ds:
                raise RenderError("the object has no pixel data")
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if not 1 <= frame <= frames:
                raise RenderError(f"frame {frame} out of range 1-{frames}")
            arr = pixel_array(ds)
            if frames > 1:
                arr = arr[frame - 1]
            img = _to_8bit(ds, arr, window)
    except RenderError:
        raise
    except Exception as e:  # pydicom and its plugins raise many kinds of errors
        raise RenderError(f"cannot decode the pixel data: {type(e).__name__}: {e}") from None
    pil = Image.fromarray(img)
    if viewport:
        pil.thumbnail(viewport)
    out = io.BytesIO()
    if media == "image/png":
        pil.save(out, "PNG")
    else:
        pil.convert("RGB" if pil.mode not in ("L", "RGB") else pil.mode).save(
            out, "JPEG", quality=quality
        )
    return out.getvalue()


def _to_8bit(ds: Any, arr: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour
        if arr.dtype != np.uint8:
            top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
            arr = np.clip(arr.astype(np.float64) / top * 255.0, 0, 255)
        return np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    if arr.ndim != 2:
        raise RenderError(f"unsupported pixel array shape {arr.shape}")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    win: tuple[float, float] | None = window
    if win is None and "WindowCenter" in ds and "WindowWidth" in ds:
        win = _first(ds.WindowCenter), _first(ds.WindowWidth)
    elif win is None and "VOILUTSequence" in ds:
        values = apply_voi_lut(arr, ds).astype(np.float64)
    if win is None or win[1] <= 0:
        lo, hi = float(values.min()), float(values.max())
    else:
        lo, hi = win[0] - win[1] / 2.0, win[0] + win[1] / 2.0
    scaled = np.clip((values - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled


def _first(value: Any) -> float:
    """A window value: pydicom gives a number, or a MultiValue when several windows exist."""
    if isinstance(value, str | bytes | int | float):
        return float(value)
    return float(value[0])
