# Semantic FPN with a PoolFormer-M48 backbone on ADE20K (paper Table 6).
_base_ = './fpn_poolformer_m36.py'

model = dict(
    backbone=dict(arch='m48', init_cfg=dict(checkpoint='checkpoints/poolformer_m48.pth.tar')))
