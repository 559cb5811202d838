"""An image loader that names the file it cannot read, registered as ``LoadImageFromFile`` in
mmdet's and mmseg's registries (their inferencers look for that name), so configs keep it."""
import io

from mmcv.transforms import LoadImageFromFile
from mmdet.registry import TRANSFORMS as DET_TRANSFORMS
from mmengine import fileio
from mmseg.registry import TRANSFORMS as SEG_TRANSFORMS
from PIL import Image

from ..utils.errors import InputNotFoundError, InvalidInputError


def truncated(data: bytes) -> bool:
    """Whether a JPEG or PNG file ends before its image data does."""
    if data[:8] == b'\x89PNG\r\n\x1a\n':
        return b'IEND' not in data[-16:]
    if data[:2] != b'\xff\xd8' or data.rstrip(b'\x00').endswith(b'\xff\xd9'):
        return False
    # No end-of-image marker at the end: cut short, or data appended after the image. Only a
    # full decode tells (Pillow's raises on the first; OpenCV returns grey rows).
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except OSError:
        return True
    return False


def check_file_bytes(data: bytes, path: str, what: str, fix: str) -> None:
    """Raise a :class:`InvalidInputError` for an empty or truncated image file."""
    if not data:
        raise InvalidInputError(f"{what} '{path}' is empty (0 bytes). {fix}")
    if truncated(data):
        raise InvalidInputError(f"{what} '{path}' is truncated: the file ends before its image "
                                f'data does (an interrupted download or copy?). {fix}')


class LoadCheckedImageFromFile(LoadImageFromFile):
    """mmcv's ``LoadImageFromFile``, refusing a missing, empty, truncated or undecodable image
    with an error that names it (unless ``ignore_empty``, which skips such images as upstream)."""

    def transform(self, results: dict):
        if self.ignore_empty:
            return super().transform(results)
        path = results['img_path']
        fix = 'Fetch or export it again, or remove it from the data set.'
        try:
            if isinstance(fileio.get_file_backend(path, backend_args=self.backend_args),
                          fileio.LocalBackend):
                check_file_bytes(fileio.get(path, backend_args=self.backend_args), path,
                                 'image', fix)
            return super().transform(results)
        except FileNotFoundError:
            raise InputNotFoundError(
                f"image '{path}' not found, though the data set lists it: put it back, or remove "
                'its entry from the annotation file.') from None
        except AssertionError:  # mmcv's answer to an image the decoder returns None for
            raise InvalidInputError(
                f"failed to load image: '{path}' is damaged or not in a format "
                f"{self.imdecode_backend} decodes. Convert it to PNG or JPEG, or remove it from "
                'the data set.') from None


for _registry in (DET_TRANSFORMS, SEG_TRANSFORMS):
    _registry.register_module('LoadImageFromFile', module=LoadCheckedImageFromFile)
