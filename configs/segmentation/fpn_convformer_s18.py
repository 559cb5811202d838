# Semantic FPN with a ConvFormer-S18 backbone (MetaFormer baselines, arXiv 2210.13452) on ADE20K:
# the PoolFormer-S12 recipe with the backbone swapped. Same stage widths, so the FPN is unchanged.
_base_ = './fpn_poolformer_s12.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='MetaFormer',
        arch='convformer_s18',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/convformer_s18.pth')))
