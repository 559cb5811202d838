# Mask R-CNN with a PoolFormer-S36 backbone on COCO (paper Table 4).
_base_ = './mask_rcnn_poolformer_s12.py'

model = dict(
    backbone=dict(arch='s36', init_cfg=dict(checkpoint='checkpoints/poolformer_s36.pth.tar')))
