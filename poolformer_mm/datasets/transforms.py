"""A segmentation label loader that refuses labels mmseg would misread (RGB, of another size
than the image, class ids >= 256 that ``uint8`` wraps), naming the file;
:func:`poolformer_mm.engine.add_data_checks` puts it in place of mmseg's ``LoadAnnotations``."""
import mmcv
import mmengine.fileio as fileio
import numpy as np
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import TRANSFORMS

from ..utils.errors import InputNotFoundError, InvalidInputError
from .loading import check_file_bytes


@TRANSFORMS.register_module()
class LoadCheckedAnnotations(LoadAnnotations):
    """mmseg's ``LoadAnnotations``, refusing a label that is not one class index (0..255) per
    pixel of its image (``ori_shape``) with an error that names the file and says how to fix it.
    """

    def _load_seg_map(self, results: dict) -> None:
        path = results['seg_map_path']
        try:
            data = fileio.get(path, backend_args=self.backend_args)
        except FileNotFoundError:
            raise InputNotFoundError(
                f"segmentation label '{path}' of image '{results.get('img_path', '?')}' not "
                'found: every image of the data set needs its label. Add it, or move the image '
                'out of the data set.') from None
        check_file_bytes(data, path, 'segmentation label',
                         'Regenerate it, or move it and its image out of the data set.')
        try:
            label = mmcv.imfrombytes(data, flag='unchanged', backend=self.imdecode_backend)
        except OSError:  # Pillow's answer to a file that is not an image, or is truncated
            label = None
        if label is None:  # OpenCV's answer
            raise InvalidInputError(
                f"segmentation label '{path}' could not be decoded as an image: the "
                'file is damaged (e.g. truncated) or not an image. Regenerate it.')
        if label.ndim == 3 and label.shape[2] == 1:
            label = label[..., 0]
        self._check_channels(label, path)
        self._check_size(label, results)
        label = self._to_uint8(label, path)
        # From here on exactly what mmseg 1.2's LoadAnnotations does with the decoded label.
        if self.reduce_zero_label is None:
            self.reduce_zero_label = results['reduce_zero_label']
        assert self.reduce_zero_label == results['reduce_zero_label'], \
            'Initialize dataset with `reduce_zero_label` as ' \
            f'{results["reduce_zero_label"]} but when load annotation ' \
            f'the `reduce_zero_label` is {self.reduce_zero_label}'
        if self.reduce_zero_label:
            # 0 (unlabelled) becomes 255 (ignored), every other class id moves down by one
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        if results.get('label_map', None) is not None:
            original = label.copy()  # map from the original ids, not from already mapped ones
            for old_id, new_id in results['label_map'].items():
                label[original == old_id] = new_id
        results['gt_seg_map'] = label
        results['seg_fields'].append('gt_seg_map')

    def _check_channels(self, label: np.ndarray, path: str) -> None:
        if label.ndim == 2:
            return
        # mmcv decodes to 2 or 3 dimensions, the third being the channels
        if label.shape[2] >= 3 and all(
                np.array_equal(label[..., 0], label[..., c]) for c in (1, 2)):
            hint = ('its colour channels are identical, so it holds class indices saved as a '
                    'colour image: save it as a single-channel (grayscale) PNG')
        else:
            hint = ('it looks like a colour-coded label: map each colour to its class index '
                    '(e.g. with the data set\'s palette) and save the indices as a single-channel '
                    '8-bit PNG')
            if self.imdecode_backend != 'pillow':
                hint += (" (or it is a palette PNG, which imdecode_backend="
                         f"'{self.imdecode_backend}' decodes to colours: use mmseg's default, "
                         "'pillow')")
        raise InvalidInputError(
            f"segmentation label '{path}' has {label.shape[2]} channels (shape "
            f'{label.shape}): expected a single-channel image of class indices '
            f'(0..num_classes-1, 255 = ignore). {hint[0].upper()}{hint[1:]}.')

    @staticmethod
    def _check_size(label: np.ndarray, results: dict) -> None:
        image_shape = results.get('ori_shape')
        if image_shape is None or tuple(label.shape[:2]) == tuple(image_shape[:2]):
            return  # (no image loaded before the label: nothing to compare with)
        path, image = results['seg_map_path'], results.get('img_path', 'its image')
        hint = ('Regenerate the label at the size of its image, or resize it with '
                'nearest-neighbour interpolation (class ids must not be blended).')
        if tuple(label.shape[:2]) == tuple(image_shape[:2])[::-1]:
            hint = ('The sizes are transposed: the image probably carries an EXIF orientation tag '
                    'that rotates it when read; rotate the image pixels and drop the tag (or '
                    'rotate the label to match).')
        raise InvalidInputError(
            f"segmentation label '{path}' is {label.shape[0]}x{label.shape[1]} (height x width) "
            f"but its image '{image}' is {image_shape[0]}x{image_shape[1]}: expected one class "
            f'index per image pixel. {hint}')

    @staticmethod
    def _to_uint8(label: np.ndarray, path: str) -> np.ndarray:
        if label.dtype == np.uint8:
            return label
        if label.dtype == bool:
            return label.astype(np.uint8)
        low, high = label.min(), label.max()
        integral = np.issubdtype(label.dtype, np.integer) or bool(
            np.all(label == np.round(label)))
        if low >= 0 and high <= 255 and integral:
            return label.astype(np.uint8)  # e.g. a 16-bit PNG whose values fit in 8 bits
        if not integral:
            problem = 'non-integer values'
        elif low < 0:
            problem = f'negative values (down to {low})'
        else:
            problem = (f'values up to {high}: mmseg reads labels as 8-bit, so class ids >= 256 '
                       f'would wrap around silently ({high} would become {int(high) % 256})')
        raise InvalidInputError(
            f"segmentation label '{path}' is a {label.dtype} image with {problem}. Expected "
            'class indices 0..255 (255 = ignore_index; with reduce_zero_label=True, 0 is '
            'unlabelled). Remap the classes to 0..254 (plus 255 for ignored pixels) and save the '
            'label as an 8-bit PNG.')
