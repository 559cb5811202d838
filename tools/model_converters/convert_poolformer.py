#!/usr/bin/env python
"""Convert a PoolFormer checkpoint (official ImageNet, mmpretrain, timm or mmengine) to this
package's backbone layout, check it against an arch, and save it.

    python tools/model_converters/convert_poolformer.py \
        checkpoints/poolformer_s12.pth.tar checkpoints/poolformer_s12_mm.pth --arch s12

``init_cfg=dict(type='Pretrained', checkpoint=...)`` reads all these layouts directly; converting
is only needed to ship a smaller file or to inspect the keys.
"""
import argparse

import torch

from poolformer_mm.models import PoolFormer, convert_to_poolformer_layout
from poolformer_mm.models.checkpoint_layouts import load_backbone_weights, read_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to convert')
    parser.add_argument('dst', help='where to write the converted backbone state dict')
    parser.add_argument('--arch', default=None,
                        help='check the result loads into PoolFormer(arch) (s12, s24, ...)')
    args = parser.parse_args()

    state, layout = convert_to_poolformer_layout(read_checkpoint(args.src))
    if args.arch:
        # The same checks as init_cfg loading: shapes and block structure must match the arch.
        load_backbone_weights(PoolFormer(args.arch), args.src)
    torch.save(state, args.dst)
    print(f'{args.src} ({layout} layout, {len(state)} tensors) -> {args.dst}')


if __name__ == '__main__':
    main()
