"""Turn the command-line flags of tools/train.py and tools/test.py into config changes.

The flags are those of mmdet 3.3's and mmseg 1.2's scripts, plus ``--eval`` (the old style) and
``--data-root``. Which upstream behaviour applies is read from the config's ``default_scope``.
"""
import argparse
import copy
import json
import logging
import os
import os.path as osp
import tempfile
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from mmdet.evaluation import DumpDetResults
from mmdet.registry import DATASETS
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import MODELS, RUNNERS
from mmengine.runner.checkpoint import CheckpointLoader

from ..checkpoint_io import check_checkpoint_path
from ..datasets.checks import check_data_roots, config_datasets, dataset_paths, override_data_root
from ..deploy.precision import log_amp_dtype
from ..engine.distributed import closing_process_group, prepare_cpu_distributed
from ..engine.hooks.data_checks import add_data_checks, coco_annotation_summary
from ..engine.work_dir import (
    ConfigCopyRunner,
    check_writable,
    checkpoint_dir,
    find_resumable_checkpoint,
    has_training_state,
    lock_work_dir,
    nearest_existing,
    process_rank,
    refuse_links_in,
    refuse_output_over_inputs,
    refuse_premade_run_folders,
)
from ..models import check_neck_in_channels
from ..models.checkpoint_fit import check_checkpoint_fits
from ..utils.config import (
    DETECTION_METRICS,
    SEGMENTATION_METRICS,
    add_hooks,
    read_config,
    set_eval_metrics,
    task_of,
)
from ..utils.errors import InvalidInputError
from ..visualization import keep_labels_apart
from .options import CheckedDictAction, add_amp_option


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--data-root', help='use this data root for every dataset of the config')
    parser.add_argument(
        '--cfg-options', nargs='+', action=CheckedDictAction,
        help='override config entries, e.g. model.backbone.init_cfg=None (key=value pairs)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Train a detector or segmentor')
    parser.add_argument('config', help='config file')
    add_amp_option(parser, 'mixed precision in training (fp16 with loss scaling on a GPU)')
    parser.add_argument('--channels-last', action='store_true',
                        help='run the neck and head convolutions channels-last, as the '
                        "backbone's token layout hands them over: same values, faster on a CPU "
                        'under bf16 (1.2x a bf16 Semantic FPN step; no gain in fp32)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by '
                        '(total batch / auto_scale_lr.base_batch_size)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CHECKPOINT, or from the latest checkpoint in the work dir if no '
        'checkpoint is given')
    _common_arguments(parser)
    return parser


def test_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector or segmentor')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--eval', nargs='+', metavar='METRIC',
        help=f'metrics to compute: {", ".join(DETECTION_METRICS)} (detection) or '
        f'{", ".join(SEGMENTATION_METRICS)} (segmentation)')
    parser.add_argument('--out', help='detection: dump predictions to this .pkl file; '
                        'segmentation: save prediction PNGs to this folder')
    parser.add_argument('--show', action='store_true', help='show results in a window')
    parser.add_argument('--show-dir', help='write pictures of the results to this folder')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds a picture is shown')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    parser.add_argument('--deploy', action='store_true',
                        help="fold the PoolFormer backbone's norms and layer scales into its "
                        'weights after loading the checkpoint and run the neck and head '
                        'channels-last: same results, faster')
    add_amp_option(parser, 'mixed precision in the backbone, neck and heads (post-processing '
                   'stays fp32; with --deploy the fastest inference)')
    _common_arguments(parser)
    return parser


def _load_config(args) -> Config:
    cfg = read_config(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    task_of(cfg)
    cfg.launcher = args.launcher
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.data_root:
        override_data_root(cfg, args.data_root)
    return cfg


def enable_training_amp(cfg: Config, choice: str = 'auto') -> None:
    """``--amp CHOICE`` in training: mmengine's ``AmpOptimWrapper`` on a GPU, else
    :class:`~poolformer_mm.engine.BF16AutocastOptimWrapper`; a mixed-precision wrapper is kept."""
    optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    on_gpu = torch.cuda.is_available()  # where the Runner puts the model
    if optim_wrapper == 'AmpOptimWrapper' and not on_gpu:
        raise InvalidInputError("the config's optim_wrapper is mmengine's AmpOptimWrapper, which "
                                "needs a GPU; on a CPU set optim_wrapper=dict(type='OptimWrapper', "
                                '...) and pass --amp')
    if optim_wrapper in ('AmpOptimWrapper', 'BF16AutocastOptimWrapper'):
        print_log(f'--amp: the config already trains with {optim_wrapper}; it is kept as the '
                  'config sets it', logger='current', level=logging.WARNING)
        return
    if optim_wrapper != 'OptimWrapper':
        raise InvalidInputError(f'--amp works on an OptimWrapper, the config uses {optim_wrapper}')
    dtype = log_amp_dtype('cuda' if on_gpu else 'cpu', choice)
    # kept in the config the work dir saves: this choice is logged before the Runner's log file
    runs = str(dtype or torch.float32).replace('torch.', '')
    cfg.amp = dict(asked=choice, runs=runs)
    if dtype is None:  # a CPU without bf16 units: fp32, and the log says why
        return
    if on_gpu:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.dtype = runs
        # fp16 needs loss scaling; bf16 has fp32's exponent range (mmengine scales by default)
        cfg.optim_wrapper.loss_scale = 'dynamic' if dtype == torch.float16 else dict(
            enabled=False)
    else:
        cfg.optim_wrapper.type = 'BF16AutocastOptimWrapper'


def config_for_training(args) -> Config:
    cfg = _load_config(args)
    missing = [key for key in ('train_dataloader', 'train_cfg', 'optim_wrapper')
               if not cfg.get(key)]
    if missing:
        raise InvalidInputError(
            f"config '{args.config}' has no {', '.join(missing)}: a model-only base (such as "
            "mmseg::_base_/models/fpn_r50.py) holds no data set, schedule or runtime; inherit a "
            "whole config (e.g. mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py) or add them")
    if args.amp:
        enable_training_amp(cfg, args.amp)
    if args.channels_last:
        add_hooks(cfg, dict(type='ChannelsLastHook'))
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) '
                               'in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':  # run_training picks the checkpoint once it holds the work dir
        cfg.resume = True
    elif args.resume is not None:
        # weights without training state: mmengine's KeyError 'meta' once the model is built
        check_checkpoint_path(args.resume, '--resume checkpoint')
        state = CheckpointLoader.load_checkpoint(args.resume, map_location='cpu', logger='silent')
        if not has_training_state(state):
            raise InvalidInputError(
                f"--resume '{args.resume}' holds no training state (the 'meta' and 'message_hub' "
                'of a checkpoint that tools/train.py wrote): it cannot be resumed. To start a '
                f'training from its weights, pass --cfg-options load_from={args.resume} without '
                '--resume.')
        cfg.resume, cfg.load_from = True, args.resume
    check_data_roots(cfg, loaders=('train_dataloader', 'val_dataloader'))
    add_data_checks(cfg)
    add_hooks(cfg, 'FiniteLossHook', 'RandomStateHook')
    # deletes outdated checkpoints after writing the new one, not before as mmengine's
    hook = cfg.get('default_hooks', {}).get('checkpoint')
    if hook is not None and hook.get('type') in ('CheckpointHook', 'mmengine.CheckpointHook',
                                                 CheckpointHook):
        hook['type'] = 'CrashSafeCheckpointHook'
    return cfg


def _enable_visualization(cfg: Config, args) -> None:
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise RuntimeError('--show/--show-dir need a visualization hook in default_hooks')
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        # absolute, so it is not nested under work_dir/<timestamp>/ as upstream does
        show_dir = osp.abspath(args.show_dir)
        if task_of(cfg) == 'mmdet':
            hook['test_out_dir'] = show_dir
            keep_labels_apart(cfg)
        else:
            # mmseg's hook would nest them under vis_data/vis_image/ with changed names
            add_hooks(cfg, dict(type='SegPicturesHook', out_dir=show_dir))
            hook['draw'] = args.show
    if task_of(cfg) == 'mmseg':
        hook['interval'] = 1  # mmseg draws every 50th image by default; draw them all


def _enable_tta(cfg: Config) -> None:
    if task_of(cfg) == 'mmdet':
        cfg.setdefault('tta_model', dict(
            type='DetTTAModel',
            tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)))
        if 'tta_pipeline' not in cfg:
            # mmdet's default: the test pipeline with its packing step replaced by a flip TTA
            pipeline = copy.deepcopy(list(cfg.test_dataloader.dataset.pipeline))
            meta_keys = ('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip',
                         'flip_direction')
            pipeline[-1] = dict(type='TestTimeAug', transforms=[
                [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
                [dict(type='PackDetInputs', meta_keys=meta_keys)]])
            cfg.tta_pipeline = pipeline
    elif 'tta_pipeline' not in cfg or 'tta_model' not in cfg:
        raise RuntimeError('--tta needs tta_model and tta_pipeline in the config')
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def enable_test_amp(cfg: Config, choice: str = 'auto') -> None:
    device = 'cuda' if torch.cuda.is_available() else 'cpu'  # where the Runner puts the model
    dtype = log_amp_dtype(device, choice)
    if dtype is not None:
        add_hooks(cfg, dict(type='InferenceAutocastHook', dtype=str(dtype).replace('torch.', '')))


def config_for_testing(args) -> Config:
    cfg = _load_config(args)
    check_checkpoint_path(args.checkpoint, 'checkpoint')
    cfg.load_from = args.checkpoint
    if args.eval:
        set_eval_metrics(cfg, args.eval)
    if args.show or args.show_dir:
        _enable_visualization(cfg, args)
    if args.tta:
        _enable_tta(cfg)
    if args.deploy:
        add_hooks(cfg, dict(type='DeployBackboneHook'))
    if args.amp:
        enable_test_amp(cfg, args.amp)
    # every data set of the config: training and test images often share names
    inputs = [path for dataset in config_datasets(cfg) for path in dataset_paths(dataset)]
    for flag, output in (('--out', args.out), ('--show-dir', args.show_dir)):
        if output:
            refuse_output_over_inputs(output, inputs, flag)
    if args.show_dir:
        check_writable(args.show_dir, '--show-dir')
    if args.out is not None:
        check_test_out(args.out, task_of(cfg), args.launcher)
    if args.out and task_of(cfg) == 'mmseg':
        refuse_links_in(args.out, '--out')  # mmseg saves the class maps in place (Pillow)
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    check_data_roots(cfg, loaders=('test_dataloader', ))
    add_data_checks(cfg)
    return cfg


def check_test_out(out: str, task: str, launcher: str = 'none') -> None:
    """Refuse an ``--out`` that cannot be written (detection: one .pkl file, segmentation: a
    folder of class maps) before the test runs; nothing is created for good."""
    if not out.strip():
        raise InvalidInputError("--out '': give a path, or leave --out out")
    pickle = out.endswith(('.pkl', '.pickle'))
    if task == 'mmdet':
        if not pickle:
            raise InvalidInputError(f'--out {out}: detection writes a .pkl or .pickle file')
        if osp.isdir(out):
            raise InvalidInputError(f'--out {out} is a folder; detection writes one .pkl file')
    elif pickle:
        raise InvalidInputError(f'--out {out}: segmentation writes a folder of class maps '
                                '(PNG), not a .pkl file; give a folder')
    elif osp.lexists(out) and not osp.isdir(out):
        raise InvalidInputError(f'--out {out} is a file; segmentation writes a folder of class '
                                'maps there')
    if process_rank(launcher) != 0:
        return  # rank 0 probes, and writes the detection dump
    folder = osp.dirname(osp.abspath(out)) if task == 'mmdet' else osp.abspath(out)
    existing = nearest_existing(folder)
    if not osp.isdir(existing):
        raise InvalidInputError(f'--out {out}: {existing} is a file, not a folder; give '
                                'another path')
    try:  # a probe in the nearest existing folder: the writers make the missing ones
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InvalidInputError(f'--out {out}: cannot write in {folder} '
                                f'({error.strerror or error}); give another path') from error


def _refuse_empty_datasets(runner) -> None:
    """Say why a data set is empty where mmengine fails with "need at least one array to
    concatenate"."""
    build = runner.build_dataloader

    def build_checked(dataloader, *args, **kwargs):
        try:
            return build(dataloader, *args, **kwargs)
        except ValueError as err:
            if 'need at least one array to concatenate' not in str(err):
                raise
            dataset = dataloader.get('dataset', {}) if isinstance(dataloader, dict) else {}
            while 'dataset' in dataset:
                dataset = dataset['dataset']
            source = osp.join(dataset.get('data_root') or '', dataset.get('ann_file') or '')
            kind = dataset.get('type')
            kind = DATASETS.get(kind) if isinstance(kind, str) and kind else kind  # or a class
            classes = ((dataset.get('metainfo') or {}).get('classes')
                       or getattr(kind, 'METAINFO', {}).get('classes'))
            if source.endswith('.json') and osp.isfile(source) and classes:
                # raises when the file names none of the classes
                coco_annotation_summary(source, classes)
            raise InvalidInputError(
                f"the data set '{source}' has no usable samples: its annotation file lists no "
                'images, or (training with filter_empty_gt=True) no image has an annotation. '
                'Check the annotation file and the data root.') from None

    runner.build_dataloader = build_checked


def build_runner(cfg: Config):
    check_writable(cfg.work_dir, '--work-dir')
    refuse_premade_run_folders(cfg.work_dir)
    prepare_cpu_distributed(cfg)
    # a mistyped backbone argument, refused before the runner logs its environment and config
    backbone = cfg.get('model', {}).get('backbone')
    if isinstance(backbone, dict) and isinstance(backbone.get('type'), str):
        try:
            backbone_class = MODELS.get(backbone['type'])
        except Exception:  # e.g. a scope whose package does not import: the runner says so
            backbone_class = None
        if hasattr(backbone_class, 'check_config_arguments'):
            backbone_class.check_config_arguments(backbone)
    # files are replaced (AtomicLocalBackend, ConfigCopyRunner); logs go to a new folder
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else ConfigCopyRunner.from_cfg(cfg)
    # a stock base's ResNet in_channels would otherwise fail in the first forward pass
    check_neck_in_channels(runner.model)
    _refuse_empty_datasets(runner)
    return runner


def run_training(argv: Optional[Sequence[str]] = None):
    args = train_parser().parse_args(argv)
    cfg = config_for_training(args)
    # held while training: a second training into the same work dir or checkpoints stops here
    hook = cfg.get('default_hooks', {}).get('checkpoint') or {}
    locks = lock_work_dir(cfg.work_dir, args.launcher,
                          checkpoint_dir(cfg.work_dir, hook.get('out_dir')))
    try:
        if args.resume == 'auto':  # the newest readable checkpoint, once the work dir is ours
            latest = find_resumable_checkpoint(cfg.work_dir, hook.get('out_dir'),
                                               hook.get('filename_tmpl'))
            if latest is None:
                print_log(f'--resume: no checkpoint in {cfg.work_dir} yet, training from the '
                          'start', logger='current')
                cfg.resume = False
            else:
                cfg.load_from = latest
        with closing_process_group():
            runner = build_runner(cfg)
            runner.train()
    finally:
        for lock in locks:
            lock.release()
    return runner


def run_testing(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = test_parser().parse_args(argv)
    cfg = config_for_testing(args)
    with closing_process_group():
        runner = build_runner(cfg)
        check_checkpoint_fits(runner.model, args.checkpoint, f"'{args.config}'")
        if args.out and task_of(cfg) == 'mmdet':
            runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
        metrics = runner.test()
        main_process = is_main_process()  # every rank has the metrics; one prints them
    if main_process:
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        print('Results: ' + format_metrics(scalars, task_of(cfg)))
        # One machine-readable line, last, for scripts that drive this one (make demo, CI).
        print('Test metrics: ' + json.dumps(scalars, sort_keys=True))
    return metrics


def format_metrics(metrics: Dict[str, float], task: str) -> str:
    """Metrics rounded as the upstream tables print them (mmseg: %, 2 decimals; mmdet: 3)."""
    digits = 3 if task == 'mmdet' else 2
    return ', '.join(f'{name} {value:.{digits}f}' for name, value in sorted(metrics.items()))
