# RetinaNet with a PoolFormer-S36 backbone on COCO (paper Table 3).
_base_ = './retinanet_poolformer_s12.py'

model = dict(
    backbone=dict(arch='s36', init_cfg=dict(checkpoint='checkpoints/poolformer_s36.pth.tar')))
