"""Parameters and multiply-accumulates (MACs) of PoolFormer backbones and whole models.

Counted with :class:`mmengine.analysis.FlopAnalyzer` (fvcore's counters, as the paper; one
multiply-add is one "flop"). The pooling mixer, GELU, element-wise ops, layer scales and ops
without a counter are not counted and are reported; so the backbones at 224x224 give the paper's
1.8 / 3.4 / 5.0 / 8.8 / 11.6 G for S12 / S24 / S36 / M36 / M48. Detectors and segmentors are
counted on their ``mode='tensor'`` forward (no post-processing).
"""
import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmdet.registry import MODELS as DET_MODELS
from mmdet.structures import DetDataSample
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS as SEG_MODELS
from mmseg.structures import SegDataSample

from ..models import PoolFormer
from ..models.backbones.base import DenseBackbone
from ..utils.config import read_config, task_of

ShapeLike = Union[int, Sequence[int]]

#: (height, width) when none is given: ImageNet's, mmdet's get_flops default, the ADE20K crop.
DEFAULT_SHAPES = {'backbone': (224, 224), 'mmdet': (1280, 800), 'mmseg': (512, 512)}

UNCOUNTED_NOTE = ('Not counted (as in fvcore, which the paper used): the pooling token mixer '
                  '(avg_pool2d), GELU, the element-wise add/sub/mul of residuals and layer '
                  'scales, conv biases, and ops without a counter (e.g. RoIAlign, NMS). '
                  'GroupNorm is counted at ~5 ops per element; 1 MAC = 1 multiply-add.')


@dataclass
class Complexity:
    """Parameters, MACs of one image of ``input_shape`` (height, width), MACs per counted
    operator kind, and the traced operators without a counter with how often each ran."""

    params: int
    macs: int
    input_shape: Tuple[int, int]
    macs_by_operator: Dict[str, int] = field(default_factory=dict)
    uncounted_ops: Dict[str, int] = field(default_factory=dict)

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def macs_g(self) -> float:
        return self.macs / 1e9


def image_shape(shape: Optional[ShapeLike], default: Tuple[int, int]) -> Tuple[int, int]:
    """Turn ``224``, ``(224,)`` or ``(1280, 800)`` into ``(height, width)``; None: ``default``."""
    if shape is None:
        return tuple(default)
    sides = [shape] if isinstance(shape, int) else list(shape)
    if len(sides) not in (1, 2) or any(int(s) != s or s <= 0 for s in sides):
        raise ValueError(f'shape must be one positive side (square image) or height and width, '
                         f'got {shape!r}')
    return int(sides[0]), int(sides[-1])


def _analyse(module: nn.Module, inputs: tuple, params_of: nn.Module,
             input_shape: Tuple[int, int]) -> Complexity:
    """Trace ``module(*inputs)`` once and collect its counts."""
    module.eval()
    # Count the paper's formulation (1x1 convs, GroupNorm), not the fast path's other ops.
    fast = [m for m in module.modules() if isinstance(m, DenseBackbone) and m.fast_path]
    for backbone in fast:
        backbone.set_fast_path(False)
    try:
        # Skipped ops go into the result; the tracer's warnings do not affect counts.
        analyzer = FlopAnalyzer(module, inputs).unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            macs = analyzer.total()
    finally:
        for backbone in fast:
            backbone.set_fast_path(True)
    return Complexity(parameter_count(params_of)[''], int(macs), input_shape,
                      {name: int(count) for name, count in analyzer.by_operator().items()},
                      dict(analyzer.unsupported_ops().most_common()))


def build_backbone(backbone: Union[str, dict, nn.Module]) -> nn.Module:
    """A PoolFormer (arch name or config dict) built with ``init_cfg=None``; a module as is."""
    if isinstance(backbone, nn.Module):
        return backbone
    kwargs = dict(arch=backbone) if isinstance(backbone, str) else copy.deepcopy(dict(backbone))
    backbone_type = kwargs.pop('type', 'PoolFormer')
    if backbone_type not in ('PoolFormer', PoolFormer):
        raise ValueError(f"backbone type {backbone_type!r} is not PoolFormer; analyse it with "
                         "part='model' or pass a built nn.Module instead")
    kwargs.pop('_delete_', None)
    kwargs['init_cfg'] = None
    return PoolFormer(**kwargs)


def backbone_complexity(backbone: Union[str, dict, nn.Module],
                        shape: Optional[ShapeLike] = None) -> Complexity:
    """Parameters and MACs of a backbone (see :func:`build_backbone`, or any module taking an
    (N, 3, H, W) tensor) for one image of ``shape`` (side or height and width; default 224)."""
    height, width = image_shape(shape, DEFAULT_SHAPES['backbone'])
    module = build_backbone(backbone)
    image = torch.randn(1, 3, height, width, device=next(module.parameters()).device)
    return _analyse(module, (image, ), module, (height, width))


def load_config(config: Union[str, Path, Config]) -> Config:
    """Read a config file (its custom_imports register PoolFormer) or pass a Config through."""
    return config if isinstance(config, Config) else read_config(str(config))


def build_model_without_pretrained(cfg: Config) -> nn.Module:
    """The mmdet / mmseg config's detector or segmentor, with no pretrained weights to load."""
    task = task_of(cfg)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.init_cfg = None
    if 'pretrained' in model_cfg:
        model_cfg.pretrained = None
    init_default_scope(task)
    return (DET_MODELS if task == 'mmdet' else SEG_MODELS).build(model_cfg)


class _TensorModeForward(nn.Module):
    """``model(inputs, data_samples, mode='tensor')``; the tracer passes tensors only, so the
    data samples (image metainfo the detector heads read) are held here."""

    def __init__(self, model: nn.Module, data_samples: list):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def dummy_batch(model: nn.Module, task: str, height: int, width: int) -> Tuple[torch.Tensor, list]:
    """A random image of an unscaled, unpadded test batch (the metainfo mmdet's RPN and the
    heads read) through the model's data preprocessor: ``(inputs, data_samples)``."""
    DataSample = DetDataSample if task == 'mmdet' else SegDataSample
    # A fixed seed keeps the RPN's proposals, and so a two-stage detector's count, repeatable.
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    sample = DataSample(metainfo=dict(
        img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
        scale_factor=(1.0, 1.0), batch_input_shape=(height, width)))
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[image], data_samples=[sample]), False)
    return data['inputs'], data['data_samples']


def model_complexity(config: Union[str, Path, Config],
                     shape: Optional[ShapeLike] = None,
                     part: str = 'model') -> Complexity:
    """Parameters and MACs of a config's (path or Config) whole detector / segmentor, or with
    ``part='backbone'`` of its ``model.backbone`` alone; ``shape`` defaults to DEFAULT_SHAPES."""
    if part not in ('model', 'backbone'):
        raise ValueError(f"part must be 'model' or 'backbone', got {part!r}")
    cfg = load_config(config)
    if part == 'backbone':
        return backbone_complexity(cfg.model.backbone, shape)
    task = task_of(cfg)
    height, width = image_shape(shape, DEFAULT_SHAPES[task])
    model = build_model_without_pretrained(cfg).eval()
    inputs, data_samples = dummy_batch(model, task, height, width)
    return _analyse(_TensorModeForward(model, data_samples), (inputs, ), model, (height, width))
