"""Image and video loading that survives real data.

Every image comes out as 8-bit RGB with EXIF orientation applied and transparency composited on white. What
cannot be loaded raises BadMedia with a short `reason` (the pre-flight report counts rows by it): a missing,
empty, truncated or non-image file, one over the pixel limit (decompression bombs), or a path that leaves the
dataset's image root (absolute paths, `..`, symlinks pointing out, URLs) unless the recipe allows external paths.
"""

from __future__ import annotations

import contextlib
import io
import re
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .formats import RowError

#: Refuse images with more pixels than this (PIL's own bomb threshold is 2x its 89M-pixel warning).
DEFAULT_PIXEL_LIMIT = 89_478_485
ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class BadMedia(RowError):
    """An image or video that cannot be used; `reason` names why."""


def resolve(path: str, root: Path | None, allow_external: bool) -> str | Path:
    """The file (or URL) an image reference points at, refusing anything outside `root` unless allowed."""
    if URL.match(path):
        if not allow_external:
            raise BadMedia("url refused", f"{path}: URLs are not fetched unless data.allow_external_paths is true")
        return path
    if root is None:
        return Path(path)
    candidate = Path(path)
    full = candidate if candidate.is_absolute() else root / candidate
    # resolve() follows symlinks, so a link inside the root that points out of it is caught too. Absolute paths
    # inside the root are fine: `datasets` imagefolder gives local images as absolute paths.
    if not allow_external and not full.resolve().is_relative_to(root.resolve()):
        what = "an absolute path outside" if candidate.is_absolute() else "resolves outside"
        raise BadMedia("outside image root", f"{path}: {what} the image root {root}; set "
                                             "data.allow_external_paths to allow it")
    return full


def open_image(ref: Any, root: Path | None, allow_external: bool = False,
               pixel_limit: int = DEFAULT_PIXEL_LIMIT) -> Image.Image:
    """An opened (header read, pixels not yet decoded) image from a path, URL, bytes dict or PIL image."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict) and ref.get("bytes"):
        data, name = ref["bytes"], ref.get("path") or "<bytes>"
    else:
        path = ref.get("path") if isinstance(ref, dict) else ref
        if not isinstance(path, str) or not path:
            raise BadMedia("not an image", f"not an image reference: {ref!r}")
        where = resolve(path, root, allow_external)
        name = str(path)
        try:
            if isinstance(where, str):
                with urllib.request.urlopen(where, timeout=30) as response:
                    data = response.read()
            else:
                data = where.read_bytes()
        except FileNotFoundError:
            raise BadMedia("missing file", f"{name}: file not found") from None
        except (OSError, ValueError) as e:
            raise BadMedia("unreadable", f"{name}: {e}") from None
    if not data:
        raise BadMedia("empty file", f"{name}: the file is empty (0 bytes)")
    try:
        with pillow_pixel_limit(pixel_limit):
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise BadMedia("too many pixels", f"{name}: over data.pixel_limit={pixel_limit} pixels "
                                          "(a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError):
        raise BadMedia("not an image", f"{name}: not an image file PIL can read") from None


@contextlib.contextmanager
def pillow_pixel_limit(pixel_limit: int):
    """Pillow's own decompression-bomb guard set to `data.pixel_limit` while an image is opened and decoded.

    Pillow refuses images over twice its module-wide MAX_IMAGE_PIXELS (about 179M pixels by default) before
    finetune can look at them, so a higher recipe limit would have no effect and the refusal would name Pillow's
    limit. finetune checks the size itself from the header (`_check_pixel_limit`), so Pillow's warning between
    one and two times the limit is redundant and silenced. The global is restored after; Pillow offers no
    per-call limit.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixel_limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def load_image(ref: Any, root: Path | None, max_pixels: int | None = None, pixel_limit: int = DEFAULT_PIXEL_LIMIT,
               allow_external: bool = False) -> Image.Image:
    """Decode one image reference to an RGB PIL image, downscaled to at most `max_pixels` pixels if set."""
    image = open_image(ref, root, allow_external, pixel_limit)
    name = _name(ref)
    _check_pixel_limit(image, ref, pixel_limit)
    try:
        with pillow_pixel_limit(pixel_limit):
            image.load()
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
    except (OSError, ValueError, SyntaxError) as e:
        reason = "truncated" if "truncated" in str(e) or "broken" in str(e) else "unreadable"
        raise BadMedia(reason, f"{name}: {e}") from None
    return downscale(image, max_pixels)


def image_size(ref: Any, root: Path | None, max_pixels: int | None = None,
               pixel_limit: int = DEFAULT_PIXEL_LIMIT, allow_external: bool = False) -> tuple[int, int]:
    """(width, height) that `load_image` would return, read from the file's header alone (no pixel decoding).

    Catches what the header shows (missing, empty, not an image, over the pixel limit, outside the image root);
    a file whose pixel data is broken (truncated) only fails when it is decoded, in training.
    """
    image = open_image(ref, root, allow_external, pixel_limit)
    _check_pixel_limit(image, ref, pixel_limit)
    width, height = image.size
    # EXIF orientations 5-8 rotate by 90 degrees: exif_transpose swaps the sides.
    if _header_exif(image).get(ORIENTATION, 1) in (5, 6, 7, 8):
        width, height = height, width
    return scaled_size(width, height, max_pixels)


def _header_exif(image: Image.Image) -> Image.Exif:
    # PIL's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixels; an eXIf chunk before
    # them (where writers put it) is already in `info` after the header is read.
    if image.format != "PNG":
        try:
            return image.getexif()
        except (OSError, SyntaxError, ValueError):  # a broken header: decoding will say what is wrong
            return Image.Exif()
    exif = Image.Exif()
    if image.info.get("exif"):
        exif.load(image.info["exif"])
    return exif


def _name(ref: Any) -> str:
    return ref if isinstance(ref, str) else (ref.get("path") if isinstance(ref, dict) else None) or "<image>"


def _check_pixel_limit(image: Image.Image, ref: Any, pixel_limit: int) -> None:
    if image.width * image.height > pixel_limit:
        raise BadMedia("too many pixels", f"{_name(ref)}: {image.width}x{image.height} is over data.pixel_limit="
                                          f"{pixel_limit} pixels (a decompression bomb?)")


def downscale(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """The image shrunk (aspect kept) to at most `max_pixels` pixels; unchanged when smaller or no limit."""
    size = scaled_size(image.width, image.height, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def scaled_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """The size `downscale` gives an image of width x height."""
    if not max_pixels or width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, CMYK converted, 16-bit and float scaled to 0..255."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("L") clips these to 0..255; scale the real range instead so the picture survives.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(array.round().astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def load_video(ref: Any, root: Path | None, frames: int | None, fps: float | None, max_pixels: int | None = None,
               pixel_limit: int = DEFAULT_PIXEL_LIMIT, allow_external: bool = False) -> list[Image.Image]:
    """Frames sampled uniformly in time, in order: from a video file (decoded with PyAV) or a list of frame files.

    `fps` samples at that rate (at most `frames` frames when both are set); `frames` alone spreads that many
    frames evenly over the clip.
    """
    if isinstance(ref, (list, tuple)):  # already frames: sample among them
        picked = _uniform(len(ref), frames if frames else len(ref))
        return [load_image(ref[i], root, max_pixels, pixel_limit, allow_external) for i in picked]
    path = ref.get("path") if isinstance(ref, dict) else ref
    if not isinstance(path, str) or not path:
        raise BadMedia("not a video", f"not a video reference: {ref!r}")
    where = resolve(path, root, allow_external)
    if isinstance(where, Path) and not where.is_file():
        raise BadMedia("missing file", f"{path}: file not found")
    if isinstance(where, Path) and where.stat().st_size == 0:
        raise BadMedia("empty file", f"{path}: the file is empty (0 bytes)")
    import av

    try:
        with av.open(str(where)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0) or None
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if total == 0:
                raise BadMedia("not a video", f"{path}: no video frames")
            count = frames or total
            if fps and rate:
                count = min(count, max(1, int(total / rate * fps)))
            wanted = set(_uniform(total, count))
            container.seek(0)
            out = []
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    out.append(to_rgb(frame.to_image()))
                if len(out) == len(wanted):
                    break
    except (av.error.FFmpegError, IndexError) as e:
        raise BadMedia("not a video", f"{path}: cannot decode video ({e})") from None
    for image in out:
        if image.width * image.height > pixel_limit:
            raise BadMedia("too many pixels", f"{path}: frames of {image.width}x{image.height} are over "
                                              f"data.pixel_limit={pixel_limit}")
    return [downscale(image, max_pixels) for image in out]


def _uniform(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(total), centred in their segments, in increasing order."""
    count = max(1, min(count, total))
    return [int((i + 0.5) * total / count) for i in range(count)]
