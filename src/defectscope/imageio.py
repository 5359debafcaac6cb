"""Reading images and masks from disk.

Everything here goes through PIL and returns float32 torch tensors:

* :func:`read_image` -> ``[C, H, W]`` in ``[0, 1]`` (``C`` is 1 or 3),
* :func:`read_mask` -> ``[H, W]`` with values exactly ``0.`` / ``1.``.

Every failure to read a file (missing, empty, truncated, corrupt, not an image, too large) raises
:class:`~defectscope.errors.ImageReadError` with a one-line message
``"cannot read image <path>: <reason>; <what to do>"``.

Pixel values by PIL mode:

* ``1``, ``L``, ``P``, ``RGB`` and the other 8-bit modes are divided by 255. ``RGBA``/``LA``/``PA``
  lose their alpha channel (it is dropped, not composited); ``P`` goes through its palette; ``CMYK``
  and ``YCbCr`` are converted to RGB by PIL.
* 16-bit modes (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) are divided by 65535 (the full 16-bit
  range, never clipped to 8 bits). Mode ``I`` (32-bit int, which is how some tools store 16-bit
  data) is divided by 65535 too, and rejected if it holds values outside ``0..65535``.
* ``F`` (32-bit float) is kept if it lies in ``[0, 1]``, divided by 255 if it lies in ``[0, 255]``,
  and rejected otherwise (and if it holds NaN/inf).
* Grayscale becomes 3 channels by repetition; colour becomes 1 channel through PIL's ``L``
  conversion (ITU-R 601-2 luminance).
* EXIF orientation is NOT applied: images are read as stored, so masks drawn on the stored pixels
  stay aligned. Multi-frame files (GIF, TIFF) give their first frame.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError, ImageReadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "is_image_file",
    "list_images",
    "read_image",
    "read_image_bytes",
    "read_mask",
    "read_image_size",
    "pil_to_tensor",
    "pil_to_mask",
]

PathLike = Union[str, os.PathLike]

#: File extensions (lower case, with the dot) that count as images; matched case-insensitively.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Largest image (width * height) that is read; larger files are refused as possible
#: decompression bombs. Defaults to PIL's own default limit (about 89 megapixels). Raise it for
#: trusted large images (``defectscope.imageio.MAX_IMAGE_PIXELS = 200_000_000``); beyond twice
#: ``PIL.Image.MAX_IMAGE_PIXELS`` PIL itself refuses the file, so raise that one too.
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

_EIGHT_BIT_GRAY = {"1", "L", "LA", "La"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I;16BS", "I;16S", "I;16LS"}


def is_image_file(path: PathLike) -> bool:
    """True if ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive) and is not hidden."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: PathLike) -> List[Path]:
    """The image files directly inside ``folder`` (not recursive), sorted by name.

    Hidden files (names starting with ``.``) and files with other extensions are ignored. An empty
    folder gives ``[]``; a missing folder (or a file) raises :class:`DatasetError`.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"image folder {folder} {what}; check the path")
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name
    )


# ----------------------------------------------------------------------------------------------
# opening


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(path: Path, reason: str, todo: str) -> ImageReadError:
    return ImageReadError(f"cannot read image {path}: {reason}; {todo}")


_RECOPY = "re-copy or regenerate the file, or remove it from the data set"


class _TooLarge(Exception):
    """Raised inside :func:`_open_raw` when an image is above :data:`MAX_IMAGE_PIXELS`."""


def _open_raw(path: Path, load: bool, data: bytes | None = None) -> Image.Image:
    if data is None:
        if not path.exists():
            raise _fail(path, "file does not exist", "check the path and the data set folder")
        if path.is_dir():
            raise _fail(path, "it is a folder, not an image file", "point to an image file")
        try:
            size = path.stat().st_size
        except OSError as exc:  # pragma: no cover - e.g. permission problems on the parent
            raise _fail(path, _one_line(exc), "check the file's permissions") from exc
    else:
        size = len(data)
    if size == 0:
        raise _fail(path, "file is empty (0 bytes)", _RECOPY)
    limit = MAX_IMAGE_PIXELS
    img = None
    try:
        with warnings.catch_warnings():
            # our own limit decides (PIL's warning would fire at PIL's limit, whatever ours is);
            # PIL still raises DecompressionBombError beyond twice its own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path if data is None else io.BytesIO(data))
            w, h = img.size
            if limit and w * h > limit:
                raise _TooLarge(f"{w}x{h} = {w * h} pixels; the limit is {limit} pixels")
            if w <= 0 or h <= 0:
                raise _fail(path, f"the image has no pixels ({w}x{h})", _RECOPY)
            if load:
                img.load()
        return img
    except BaseException:
        if img is not None:
            img.close()
        raise


def _open(path: PathLike, load: bool = True, data: bytes | None = None) -> Image.Image:
    """Open (and by default fully decode) an image, mapping every failure to ImageReadError.

    ``data``: the file's bytes (an upload); ``path`` is then only the name used in messages.
    """
    path = Path(path).expanduser() if data is None else Path(path)
    try:
        return _open_raw(path, load, data)
    except ImageReadError:
        raise
    except _TooLarge as exc:
        raise _fail(
            path,
            f"image is too large ({exc}, a protection against decompression bombs)",
            "downscale it, or raise defectscope.imageio.MAX_IMAGE_PIXELS if the file is trusted",
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pil_limit = Image.MAX_IMAGE_PIXELS
        raise _fail(
            path,
            f"image is too large (PIL refuses more than 2 x PIL.Image.MAX_IMAGE_PIXELS = "
            f"{2 * pil_limit if pil_limit else 0} pixels, a protection against decompression bombs)",
            "downscale it, or raise defectscope.imageio.MAX_IMAGE_PIXELS and "
            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted",
        ) from exc
    except UnidentifiedImageError as exc:
        raise _fail(
            path, "not a recognised image file", "convert it to PNG or JPEG, or remove it"
        ) from exc
    except PermissionError as exc:
        raise _fail(path, "permission denied", "check the file's permissions") from exc
    except MemoryError as exc:  # pragma: no cover
        raise _fail(path, "out of memory while decoding", "downscale the image") from exc
    except Exception as exc:  # truncated / corrupt data: OSError, SyntaxError, ValueError, ...
        reason = _one_line(exc) or type(exc).__name__
        raise _fail(path, f"file is truncated or corrupt ({reason})", _RECOPY) from exc


def read_image_size(path: PathLike) -> Tuple[int, int]:
    """``(width, height)`` of an image from its header only (does not decode the pixels)."""
    img = _open(path, load=False)
    try:
        return img.size
    finally:
        img.close()


# ----------------------------------------------------------------------------------------------
# conversion


def _u8_to_float(img: Image.Image) -> torch.Tensor:
    """An 8-bit ``L`` or ``RGB`` image as float32 ``[H, W]`` / ``[3, H, W]`` divided by 255, in one
    torch pass: the same float32 division as numpy's ``asarray(img, float32) / 255`` (bit for bit,
    tested), but threaded and without numpy's float copy and transpose. A 900x900 RGB PNG reads in
    18 ms instead of 21, of which PIL's decode is 15.5 (``python benchmarks/decode.py``)."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    arr = arr if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _gray_array(img: Image.Image, path: object) -> np.ndarray:
    """Grayscale [H, W] float32 in [0, 1] for the single-channel modes (and None otherwise)."""
    mode = img.mode
    if mode in _EIGHT_BIT_GRAY:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img)
        if arr.dtype.kind == "i":  # signed 16-bit variants: negative values are not light
            arr = np.clip(arr, 0, None)
        return arr.astype(np.float32) / 65535.0
    if mode == "I":
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise _fail(
                Path(str(path)),
                f"32-bit integer image with values {lo}..{hi} outside the 16-bit range 0..65535",
                "save it as an 8- or 16-bit image",
            )
        return arr.astype(np.float32) / 65535.0
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise _fail(Path(str(path)), "float image contains NaN or infinite values",
                        "save it as an 8- or 16-bit image")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            return arr.copy()
        if lo >= 0.0 and hi <= 255.0:
            return arr / 255.0
        raise _fail(
            Path(str(path)),
            f"float image with values {lo:g}..{hi:g} outside [0, 1] and [0, 255]",
            "rescale it to [0, 1] or save it as an 8- or 16-bit image",
        )
    return None  # type: ignore[return-value]


def pil_to_tensor(img: Image.Image, channels: int = 3, path: object = "<image>") -> torch.Tensor:
    """Convert a PIL image to a float32 tensor ``[channels, H, W]`` in ``[0, 1]`` (see module doc)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if img.mode in _EIGHT_BIT_GRAY:
        gray = _u8_to_float(img if img.mode == "L" else img.convert("L"))[None]
    else:
        gray = _gray_array(img, path)
        gray = None if gray is None else torch.from_numpy(np.ascontiguousarray(gray))[None]
    if gray is not None:
        return gray.expand(3, -1, -1).contiguous() if channels == 3 else gray
    try:
        rgb = img if img.mode == "RGB" else img.convert("RGB")  # no copy for what is RGB already
        out = rgb.convert("L") if channels == 1 else rgb
    except Exception as exc:
        raise _fail(
            Path(str(path)),
            f"unsupported image mode {img.mode!r} ({_one_line(exc)})",
            "convert it to an RGB or grayscale PNG",
        ) from exc
    t = _u8_to_float(out)
    return t[None] if t.ndim == 2 else t


def read_image(path: PathLike, channels: int = 3) -> torch.Tensor:
    """Read an image file as a float32 tensor ``[channels, H, W]`` in ``[0, 1]``.

    ``channels`` is 1 (colour is reduced to luminance) or 3 (grayscale is repeated). See the module
    docstring for how each PIL mode is scaled. Raises :class:`ImageReadError` for any file that
    cannot be read.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    img = _open(path)
    try:
        return pil_to_tensor(img, channels, path=Path(path).expanduser())
    except ImageReadError:
        raise
    except Exception as exc:  # a decoded file whose pixels PIL/numpy cannot convert
        raise _fail(Path(path).expanduser(), f"cannot convert its pixels ({_one_line(exc)})", _RECOPY) from exc
    finally:
        img.close()


def read_image_bytes(data: bytes, channels: int = 3, name: str = "<upload>") -> torch.Tensor:
    """:func:`read_image` for a file's bytes (an upload): the same decoding and the same one-line
    :class:`ImageReadError` messages, with ``name`` in place of the path."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    img = _open(name, data=bytes(data))
    try:
        return pil_to_tensor(img, channels, path=name)
    except ImageReadError:
        raise
    except Exception as exc:
        raise _fail(Path(name), f"cannot convert its pixels ({_one_line(exc)})", _RECOPY) from exc
    finally:
        img.close()


def pil_to_mask(img: Image.Image, path: object = "<mask>") -> torch.Tensor:
    """Binarize a PIL mask image into a float32 tensor ``[H, W]`` of exactly 0./1.

    A pixel is anomalous when its value is > 0: MVTec masks are 0/255, VisA masks are small label
    images (0 = background), and anything non-binary (e.g. anti-aliased edges) is binarized at > 0.
    ``P`` (palette) masks use the palette index, so index 0 is background. Colour masks count a
    pixel as anomalous when any colour channel is > 0; alpha channels are ignored.
    """
    mode = img.mode
    if mode == "P":
        arr = np.asarray(img)
    elif mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "PA"):
        arr = np.asarray(img.convert("RGB")).max(axis=2)
    elif mode in ("LA", "La"):
        arr = np.asarray(img.convert("L"))
    else:
        gray = _gray_array(img, path)
        if gray is None:
            try:
                gray = np.asarray(img.convert("L"))
            except Exception as exc:
                raise _fail(Path(str(path)), f"unsupported mask mode {mode!r}",
                            "save the mask as an 8-bit grayscale PNG") from exc
        arr = gray
    return torch.from_numpy(np.ascontiguousarray(arr > 0, dtype=np.float32))


def read_mask(path: PathLike) -> torch.Tensor:
    """Read a ground-truth mask as a float32 tensor ``[H, W]`` with values exactly 0. and 1.

    Non-binary masks are binarized at > 0 (see :func:`pil_to_mask`). Raises
    :class:`ImageReadError` for any file that cannot be read.
    """
    img = _open(path)
    try:
        return pil_to_mask(img, path=Path(path).expanduser())
    except ImageReadError:
        raise
    except Exception as exc:
        raise _fail(Path(path).expanduser(), f"cannot convert its pixels ({_one_line(exc)})", _RECOPY) from exc
    finally:
        img.close()
