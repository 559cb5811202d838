# RetinaNet with a PoolFormer-S24 backbone on COCO (paper Table 3).
_base_ = './retinanet_poolformer_s12.py'

model = dict(
    backbone=dict(arch='s24', init_cfg=dict(checkpoint='checkpoints/poolformer_s24.pth.tar')))
