# Mask R-CNN with a PoolFormer-S24 backbone on COCO (paper Table 4).
_base_ = './mask_rcnn_poolformer_s12.py'

model = dict(
    backbone=dict(arch='s24', init_cfg=dict(checkpoint='checkpoints/poolformer_s24.pth.tar')))
