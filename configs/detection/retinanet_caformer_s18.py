# RetinaNet with a CAFormer-S18 backbone (MetaFormer baselines, arXiv 2210.13452) on COCO:
# the PoolFormer-S12 recipe with the backbone swapped. Same stage widths, so the FPN is unchanged.
_base_ = './retinanet_poolformer_s12.py'

checkpoint_file = 'https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth'  # noqa: E501
model = dict(
    backbone=dict(
        _delete_=True,
        type='MetaFormer',
        arch='caformer_s18',
        out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
