# Semantic FPN with a PoolFormer-S24 backbone on ADE20K (paper Table 6).
_base_ = './fpn_poolformer_s12.py'

model = dict(
    backbone=dict(arch='s24', init_cfg=dict(checkpoint='checkpoints/poolformer_s24.pth.tar')))
