# UPerNet with a PoolFormer-S24 backbone on ADE20K (the S12 recipe).
_base_ = './upernet_poolformer_s12.py'

checkpoint_file = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s24.pth.tar'  # noqa: E501
model = dict(backbone=dict(arch='s24', init_cfg=dict(checkpoint=checkpoint_file)))
