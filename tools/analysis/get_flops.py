#!/usr/bin/env python
"""Parameters and MACs of a config's detector / segmentor, of its backbone, or of a bare arch.

    python tools/analysis/get_flops.py --arch s12 s24 s36 m36 m48          # 224x224
    python tools/analysis/get_flops.py configs/detection/retinanet_poolformer_s12.py   # 1280x800
    python tools/analysis/get_flops.py configs/segmentation/fpn_poolformer_s12.py --shape 512
    python tools/analysis/get_flops.py CONFIG --part backbone                          # 224x224

See ``python tools/analysis/get_flops.py --help``.
"""
from poolformer_mm.cli.get_flops import main
from poolformer_mm.utils.known_warnings import ignore_known_warnings

if __name__ == '__main__':
    ignore_known_warnings()
    main()
