#!/usr/bin/env python
"""Convert a PoolFormer checkpoint to this package's names, check it against an arch, and save it.

A whole detector or segmentor (the paper's released mmdet 2.19 / mmseg 0.19 checkpoints, or an
mmengine checkpoint of this package) keeps its neck, heads and meta; only its backbone keys are
renamed:

    python tools/model_converters/convert_poolformer.py \
        checkpoints/retinanet_poolformer_s12.pth checkpoints/retinanet_poolformer_s12_mm.pth

An ImageNet classifier (official ``.pth.tar``, mmpretrain, timm) or a backbone saved alone becomes
a backbone state dict, for ``init_cfg``:

    python tools/model_converters/convert_poolformer.py \
        checkpoints/poolformer_s12.pth.tar checkpoints/poolformer_s12_mm.pth --arch s12

``tools/test.py``, ``load_from`` and ``init_cfg`` read all these layouts directly.
"""
import argparse
import os.path as osp

import torch

from poolformer_mm.checkpoint_io import check_checkpoint_path
from poolformer_mm.engine.work_dir import refuse_output_over_inputs, refuse_symlinks
from poolformer_mm.models import PoolFormer, convert_to_poolformer_layout
from poolformer_mm.models.checkpoint_layouts import (
    FINAL_NORM_CHOICES,
    convert_dense_checkpoint,
    holds_whole_model,
    load_converted_weights,
    read_checkpoint,
)
from poolformer_mm.utils.errors import InputNotFoundError, InvalidInputError, report_user_errors


def _poolformer(arch: str, **kwargs) -> PoolFormer:
    """``PoolFormer(arch, **kwargs)``; an arch it refuses is a user error."""
    try:
        return PoolFormer(arch, **kwargs)
    except ValueError as err:
        raise InvalidInputError(f'--arch {arch}: {err}') from None


@report_user_errors
def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to convert')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--arch', default=None,
                        help='check the backbone loads into PoolFormer(arch) (s12, s24, ...)')
    parser.add_argument('--final-norm', choices=FINAL_NORM_CHOICES, default=None,
                        help="ImageNet classifiers: 'initial' leaves the classifier's final norm "
                        "out (the last output norm keeps its initial weights), 'classifier' "
                        'writes it as the last output norm; default: the layout\'s own start '
                        "('initial' for the official file, as the paper's code)")
    parser.add_argument('--no-ema', action='store_true',
                        help="timm train.py checkpoints with EMA weights: convert 'state_dict' "
                        "instead of 'state_dict_ema' (timm's default)")
    args = parser.parse_args()

    check_checkpoint_path(args.src)  # a missing file or a folder: one line
    if osp.isdir(args.dst):
        raise InvalidInputError(f"DST '{args.dst}' is a folder: give the file to write")
    refuse_output_over_inputs(args.dst, [args.src], 'DST')
    refuse_symlinks([args.dst], 'DST')
    if not osp.isdir(osp.dirname(osp.abspath(args.dst))):
        raise InputNotFoundError(f"cannot write '{args.dst}': its folder does not exist")
    if args.arch:
        _poolformer(args.arch)
    checkpoint = read_checkpoint(args.src)  # refused, truncated or foreign files: one line
    if not isinstance(checkpoint, dict):
        raise InvalidInputError(f"'{args.src}' holds a {type(checkpoint).__name__}, not a "
                                'checkpoint (a dict of tensors); give a PoolFormer checkpoint')
    try:
        whole = holds_whole_model(checkpoint)
        if whole:
            if args.final_norm or args.no_ema:
                raise InvalidInputError('--final-norm and --no-ema are for ImageNet classifier '
                                        'checkpoints; this one holds a whole model')
            converted, layout = convert_dense_checkpoint(checkpoint)
            state = converted['state_dict']
            backbone = {k[len('backbone.'):]: v for k, v in state.items()
                        if k.startswith('backbone.')}
        else:
            state, layout = convert_to_poolformer_layout(
                checkpoint, use_ema=not args.no_ema, final_norm=args.final_norm)
            converted, backbone = state, state
    except InvalidInputError as err:  # its message does not name the file
        raise InvalidInputError(f'{args.src}: {err}') from None
    if args.arch:  # init_cfg's checks, with the file's output norms (a RetinaNet's from stage 1)
        stages = sorted({int(k.split('.')[1]) for k in backbone if k.startswith('output_norms.')})
        load_converted_weights(_poolformer(args.arch, out_indices=stages or (0, 1, 2, 3)),
                               dict(backbone), f"'{args.src}' ({layout} layout)")
    torch.save(converted, args.dst)
    if whole:
        others = len(state) - len(backbone)
        kept = ', '.join(sorted(converted['meta'])) or 'none'
        print(f'{args.src} ({layout} layout; a whole model: {len(backbone)} backbone tensors '
              f'converted, {others} neck and head tensors and the meta ({kept}) kept) '
              f'-> {args.dst}')
    else:
        print(f'{args.src} ({layout} layout; backbone of {len(state)} tensors) -> {args.dst}')


if __name__ == '__main__':
    main()
