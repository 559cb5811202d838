"""Detection pictures whose labels stay readable when boxes overlap (mmdet writes each label at
its box's top-left corner, so labels of nearby boxes print over each other)."""
from mmdet.visualization import DetLocalVisualizer
from mmengine.registry import VISUALIZERS

from .utils.config import add_custom_imports


@VISUALIZERS.register_module()
class DetLabelsApartVisualizer(DetLocalVisualizer):
    """``DetLocalVisualizer`` (same arguments) that moves a label covering one drawn before it
    down below it, and one running off the right edge to the left."""

    def set_image(self, image):
        super().set_image(image)
        self._label_boxes = []  # (x0, y0, x1, y1) in pixels of the labels on this picture

    def draw_texts(self, texts, positions, *args, **kwargs):
        super().draw_texts(texts, positions, *args, **kwargs)
        if not isinstance(texts, str):  # mmdet draws one box label per call
            return self
        text = self.ax_save.texts[-1]
        renderer = self.fig_save.canvas.get_renderer()
        to_pixels = self.ax_save.transData.inverted()
        (x0, y1), (x1, y0) = to_pixels.transform(text.get_window_extent(renderer).get_points())
        x0, y0, x1, y1 = min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)
        gap = 2  # the label's background box is padded beyond the text
        # a label that would run off the right edge moves left (a box near it cuts it short)
        shift = min(max(x1 + gap - self.width, 0), x0)
        x0, x1 = x0 - shift, x1 - shift
        top, moved = y0, True
        while moved:
            moved = False
            for a0, b0, a1, b1 in self._label_boxes:
                if x0 < a1 + gap and a0 < x1 + gap and y0 < b1 + gap and b0 < y1 + gap:
                    y0, y1 = b1 + 2 * gap, b1 + 2 * gap + (y1 - y0)
                    moved = True
        x, y = text.get_position()
        text.set_position((x - shift, y + y0 - top))
        self._label_boxes.append((x0, y0, x1, y1))
        return self


def keep_labels_apart(cfg) -> None:
    """Draw the pictures of config ``cfg`` with :class:`DetLabelsApartVisualizer` where it names
    mmdet's ``DetLocalVisualizer`` (a visualiser of the user's own is left as it is)."""
    visualizer = cfg.get('visualizer')
    if visualizer and visualizer.get('type') in ('DetLocalVisualizer', 'mmdet.DetLocalVisualizer'):
        visualizer['type'] = 'DetLabelsApartVisualizer'
        add_custom_imports(cfg, __name__)  # the config dumped to the work dir finds it
