#!/usr/bin/env python
"""Train a detector (mmdet config) or segmentor (mmseg config) with a PoolFormer backbone.

    python tools/train.py configs/detection/retinanet_poolformer_s12.py [--amp] [--resume]

Flags are those of mmdet 3.3's / mmseg 1.2's tools/train.py, plus --data-root.
"""
from poolformer_mm.apis import run_training

if __name__ == '__main__':
    run_training()
