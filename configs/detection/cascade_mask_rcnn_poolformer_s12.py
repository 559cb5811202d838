# Cascade Mask R-CNN with a PoolFormer-S12 backbone on COCO. The paper has no Cascade results;
# this is its Mask R-CNN recipe (1x schedule, AdamW lr 2e-4, weight decay 1e-4, all four stages
# into the FPN) on mmdet's Cascade Mask R-CNN base.
_base_ = 'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['poolformer_mm'], allow_failed_imports=False)

checkpoint_file = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s12.pth.tar'  # noqa: E501
model = dict(
    backbone=dict(
        _delete_=True,
        type='PoolFormer',
        arch='s12',
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[64, 128, 320, 512], num_outs=5))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4))
