# RetinaNet with a PoolFormer-S12 backbone on COCO (paper Table 3): 1x schedule, AdamW.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['poolformer_mm'], allow_failed_imports=False)

checkpoint_file = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s12.pth.tar'  # noqa: E501
model = dict(
    backbone=dict(
        _delete_=True,
        type='PoolFormer',
        arch='s12',
        # Only the last three stages feed the FPN; the backbone builds no output norm for
        # stage 0, so DDP needs no find_unused_parameters.
        out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[128, 320, 512], start_level=0, add_extra_convs='on_input', num_outs=5))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4))
