#!/usr/bin/env python
"""Build every PoolFormer arch and print its parameter count and the feature maps of one image."""
import torch

from poolformer_mm.models import PoolFormer


def main():
    image = torch.rand(1, 3, 512, 512)
    print(f'{"arch":5} {"params":>12}  output shapes for a 512x512 image (strides 4, 8, 16, 32)')
    for arch in PoolFormer.arch_settings:
        model = PoolFormer(arch).eval()
        with torch.no_grad():
            shapes = [tuple(o.shape[1:]) for o in model(image)]
        params = sum(p.numel() for p in model.parameters())
        print(f'{arch:5} {params:>12,}  {shapes}')


if __name__ == '__main__':
    main()
