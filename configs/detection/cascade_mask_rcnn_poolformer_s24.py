# Cascade Mask R-CNN with a PoolFormer-S24 backbone on COCO (the S12 recipe).
_base_ = './cascade_mask_rcnn_poolformer_s12.py'

checkpoint_file = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s24.pth.tar'  # noqa: E501
model = dict(backbone=dict(arch='s24', init_cfg=dict(checkpoint=checkpoint_file)))
