# UPerNet with a PoolFormer-S12 backbone on ADE20K. The paper reports Semantic FPN only; this is
# mmseg's UPerNet recipe for Swin (160k iterations, batch 16, AdamW lr 6e-5, weight decay 0.01
# except norms and layer scales, 1500-iteration warm-up, linear decay), the recipe under which
# hierarchical backbones (Swin, Twins, ConvNeXt) report UPerNet results, so ours compare.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py'
]
custom_imports = dict(
    imports=['poolformer_mm', 'poolformer_mm.models.decode_heads'], allow_failed_imports=False)

checkpoint_file = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s12.pth.tar'  # noqa: E501
crop_size = (512, 512)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='PoolFormer',
        arch='s12',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    # no neck: the heads read the backbone's stages (the auxiliary head stage 2)
    # mmseg's UPerHead and FCNHead (same weights, loss and gradients) with the loss computed a
    # band of rows at a time instead of on the resized 150-class logits
    decode_head=dict(type='LowMemoryUPerHead', in_channels=[64, 128, 320, 512], num_classes=150),
    auxiliary_head=dict(type='LowMemoryFCNHead', in_channels=320, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys=dict(norm=dict(decay_mult=0.), layer_scale=dict(decay_mult=0.))))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, begin=1500, end=160000, by_epoch=False)
]
train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16
