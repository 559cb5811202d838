# Semantic FPN with a PoolFormer-S36 backbone on ADE20K (paper Table 6).
_base_ = './fpn_poolformer_s12.py'

model = dict(
    backbone=dict(arch='s36', init_cfg=dict(checkpoint='checkpoints/poolformer_s36.pth.tar')))
