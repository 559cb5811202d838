# UPerNet with a PoolFormer-S36 backbone on ADE20K (the S12 recipe).
_base_ = './upernet_poolformer_s12.py'

checkpoint_file = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s36.pth.tar'  # noqa: E501
model = dict(backbone=dict(arch='s36', init_cfg=dict(checkpoint=checkpoint_file)))
