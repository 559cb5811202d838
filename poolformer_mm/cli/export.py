"""tools/deployment/pytorch2onnx.py: export a config's model to ONNX and check it."""
import argparse
import copy
import glob
import os.path as osp
import tempfile
from typing import Optional, Sequence, Tuple

from mmengine.config import Config

from ..datasets.synthetic import make_toy_ade, make_toy_coco
from ..deploy.onnx.export import build_model, export_onnx
from ..deploy.onnx.verify import TOLERANCES, verify_onnx
from ..engine.work_dir import refuse_output_over_inputs, refuse_symlinks
from ..utils.config import task_of
from ..utils.errors import InvalidInputError
from .options import CheckedDictAction


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export a segmentor, RetinaNet or (Cascade) Mask R-CNN with a folded '
        'PoolFormer backbone to ONNX (opset 17).')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: the config\'s crop size for segmentation, '
                        'its test Resize scale for detection, rounded up to 32)')
    parser.add_argument('--dynamic', action='store_true',
                        help='batch, height and width as dynamic axes ((Cascade) Mask R-CNN: '
                        'height and width; it runs one image at a time)')
    parser.add_argument('--logits', action='store_true',
                        help='segmentation: also output the logits (N, C, H, W), for debugging')
    parser.add_argument('--verify', action='store_true',
                        help='run the file in ONNX Runtime on an image and compare with '
                        'PyTorch; exit code 1 over tolerance')
    parser.add_argument('--image', help='image for --verify (default: one of a toy set '
                        'written to a temporary folder)')
    parser.add_argument('--device', default='cpu', help="load the model on this device, e.g. "
                        "'cuda:0' (tracing and --verify run on the CPU)")
    parser.add_argument('--cfg-options', nargs='+', action=CheckedDictAction,
                        help='override config settings, e.g. model.test_cfg.score_thr=0.3')
    return parser.parse_args(argv)


def _round_up(value: float, divisor: int = 32) -> int:
    return int(-(-int(value) // divisor) * divisor)


def default_shape(cfg: Config) -> Tuple[int, int]:
    """The config's inference size: crop size (segmentation) or test Resize scale (detection)."""
    if task_of(cfg) == 'mmseg':
        size = cfg.model.get('data_preprocessor', {}).get('size')
        if size:
            return tuple(_round_up(s) for s in size)
    else:
        pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get('pipeline', [])
        for transform in pipeline:
            if transform.get('type') == 'Resize' and transform.get('scale'):
                width, height = transform['scale']  # mmcv scales are (w, h)
                return _round_up(height), _round_up(width)
    raise InvalidInputError(f'cannot tell the input size from {cfg.filename}: pass --shape H W')


def toy_image(task: str, folder: str) -> str:
    """One validation image of the matching toy set, written to ``folder``."""
    if task == 'mmseg':
        make_toy_ade(folder, num_train=0, num_val=1)
        return sorted(glob.glob(osp.join(folder, 'images', 'validation', '*')))[0]
    make_toy_coco(folder, num_train=0, num_val=1)
    return sorted(glob.glob(osp.join(folder, 'val2017', '*')))[0]


# each figure of verify_onnx's result in the report's words, with its tolerance
REPORT = dict(
    pixel_agreement='class maps agree on {:.3%} of pixels (need >= {:.1%})',
    logits_rel='logits max diff {:.2e} of the largest (need <= {:.0e})',
    box_rel='boxes max rel diff {:.2e} (need <= {:.0e})',
    score_abs='scores max diff {:.2e} (need <= {:.0e})',
    mask_iou='pasted masks agree on {:.2%} of the pixels they mark (need >= {:.0%})')


def format_report(result: dict) -> str:
    """The agreement figures against their tolerances, one line."""
    parts = [text.format(result[key], TOLERANCES[key]) for key, text in REPORT.items()
             if key in result]
    if 'detections_onnx' in result:
        parts.insert(0, f"{result['detections_onnx']} detections (PyTorch "
                        f"{result['detections_torch']}, {result['unmatched']} unmatched)")
    size = 'x'.join(map(str, result['shape']))
    return f"verify at {size}: {'; '.join(parts)}: {'OK' if result['ok'] else 'OVER TOLERANCE'}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    refuse_output_over_inputs(args.out, [args.config, args.checkpoint], '--out')
    refuse_symlinks([args.out], '--out')
    model, cfg = build_model(args.config, args.checkpoint, args.cfg_options)
    shape = tuple(args.shape) if args.shape else default_shape(cfg)
    info = export_onnx(copy.deepcopy(model).to(args.device), cfg, args.out, shape, args.dynamic,
                       args.logits)
    print(f"wrote {args.out}: {info['task']}, input {shape[0]}x{shape[1]}"
          f"{' (dynamic)' if args.dynamic else ''}, outputs {', '.join(info['outputs'])}, "
          f"backbone {'folded' if info['backbone_folded'] else 'as trained (no folded form)'}")
    if not args.verify:
        return 0
    with tempfile.TemporaryDirectory() as folder:
        image = args.image or toy_image(task_of(cfg), folder)
        results = [verify_onnx(args.out, model, image)]
        if args.dynamic:  # a second size, not the export one
            results.append(verify_onnx(args.out, model, image, (shape[0] + 32, shape[1] + 64)))
    for result in results:
        print(format_report(result))
    return 0 if all(result['ok'] for result in results) else 1
