# Semantic FPN with a PoolFormer-M48 backbone on ADE20K (paper Table 6).
_base_ = './fpn_poolformer_m36.py'

checkpoint_file = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_m48.pth.tar'  # noqa: E501
model = dict(backbone=dict(arch='m48', init_cfg=dict(checkpoint=checkpoint_file)))
