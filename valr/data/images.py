"""Image loading with errors that name the record and the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageLoadError(ValueError):
    pass


def load_image(path: Path, record_id: str | None = None) -> Image.Image:
    """Open an image fully (so a truncated file fails here, not mid-batch) as RGB."""
    who = f"record {record_id!r}: " if record_id is not None else ""
    if not Path(path).is_file():
        raise ImageLoadError(f"{who}image file {path} does not exist; fix the path in the records file "
                             "(relative paths are resolved against the records file's directory)")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ImageLoadError(f"{who}cannot read image {path}: {e}; replace or remove the file") from None
