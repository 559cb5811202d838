#!/usr/bin/env python
"""Convert a PoolFormer checkpoint (official ImageNet, mmpretrain, timm or mmengine) to this
package's backbone layout, check it against an arch, and save it.

    python tools/model_converters/convert_poolformer.py \
        checkpoints/poolformer_s12.pth.tar checkpoints/poolformer_s12_mm.pth --arch s12

``init_cfg=dict(type='Pretrained', checkpoint=...)`` reads all these layouts directly; converting
is only needed to ship a smaller file or to inspect the keys.
"""
import argparse
import os.path as osp

import torch

from poolformer_mm.checkpoint_io import check_checkpoint_path
from poolformer_mm.engine.work_dir import refuse_output_over_inputs, refuse_symlinks
from poolformer_mm.models import PoolFormer, convert_to_poolformer_layout
from poolformer_mm.models.checkpoint_layouts import load_backbone_weights, read_checkpoint
from poolformer_mm.utils.errors import InputNotFoundError, InvalidInputError, report_user_errors


@report_user_errors
def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to convert')
    parser.add_argument('dst', help='where to write the converted backbone state dict')
    parser.add_argument('--arch', default=None,
                        help='check the result loads into PoolFormer(arch) (s12, s24, ...)')
    args = parser.parse_args()

    check_checkpoint_path(args.src)  # a missing file or a folder: one line
    if osp.isdir(args.dst):
        raise InvalidInputError(f"DST '{args.dst}' is a folder: give the file to write")
    refuse_output_over_inputs(args.dst, [args.src], 'DST')
    refuse_symlinks([args.dst], 'DST')
    if not osp.isdir(osp.dirname(osp.abspath(args.dst))):
        raise InputNotFoundError(f"cannot write '{args.dst}': its folder does not exist")
    try:
        backbone = PoolFormer(args.arch) if args.arch else None
    except ValueError as err:
        raise InvalidInputError(f'--arch {args.arch}: {err}') from None
    checkpoint = read_checkpoint(args.src)  # refused, truncated or foreign files: one line
    if not isinstance(checkpoint, dict):
        raise InvalidInputError(f"'{args.src}' holds a {type(checkpoint).__name__}, not a "
                                'checkpoint (a dict of tensors); give a PoolFormer checkpoint')
    try:
        state, layout = convert_to_poolformer_layout(checkpoint)
    except InvalidInputError as err:  # its message does not name the file
        raise InvalidInputError(f'{args.src}: {err}') from None
    if backbone is not None:
        # The same checks as init_cfg loading: shapes and block structure must match the arch.
        load_backbone_weights(backbone, args.src)
    torch.save(state, args.dst)
    print(f'{args.src} ({layout} layout, {len(state)} tensors) -> {args.dst}')


if __name__ == '__main__':
    main()
