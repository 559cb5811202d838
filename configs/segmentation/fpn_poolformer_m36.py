# Semantic FPN with a PoolFormer-M36 backbone on ADE20K (paper Table 6).
_base_ = './fpn_poolformer_s12.py'

model = dict(
    backbone=dict(arch='m36', init_cfg=dict(checkpoint='checkpoints/poolformer_m36.pth.tar')),
    neck=dict(in_channels=[96, 192, 384, 768]))
