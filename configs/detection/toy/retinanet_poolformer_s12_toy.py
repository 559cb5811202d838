# RetinaNet PoolFormer-S12 trained from scratch on the synthetic toy set written by
# python tools/dataset_converters/make_toy_data.py coco data/toy_coco
# (320 128x128 images of upright circles, squares and triangles): about 5 minutes on 2 CPU cores.
_base_ = '../retinanet_poolformer_s12.py'

data_root = 'data/toy_coco/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
image_size = (128, 128)
max_epochs = 12

model = dict(
    backbone=dict(init_cfg=None),
    # A 128-channel neck and head (256 on COCO): the head's convolutions are most of the compute
    # at this image size. GroupNorm in the head (as FCOS and ATSS have it) is what makes a
    # detector trained from scratch learn in minutes (on shapes turned at random, as the toy set
    # had them before: mAP 0.36 -> 0.62-0.75 in the same 12 epochs).
    neck=dict(out_channels=128),
    bbox_head=dict(num_classes=3, in_channels=128, feat_channels=128,
                   norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)),
    # The toy's shapes never overlap: one box per place, whatever its class (mmdet suppresses
    # per class by default, which can leave a second label on a shape)
    test_cfg=dict(nms=dict(class_agnostic=True)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline,
                 ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/')))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline,
                 ann_file='annotations/instances_val2017.json', data_prefix=dict(img='val2017/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# From scratch on 320 images: batch 4 (the cheapest per image on 2 cores), 960 iterations,
# lr 1e-3 after a 80-iteration warm-up, ten times lower for the last two epochs (the step that
# sharpens the class scores most). Validated every 2 epochs, so that the curves show progress.
optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=dict(max_norm=10.))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=80),
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=max_epochs, milestones=[10], gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
# A log line (with its ETA) every 20 iterations: every 5-10 s on 2 quiet cores. Pictures show
# the boxes that score at least 0.5.
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(interval=max_epochs // 2),
                     visualization=dict(score_thr=0.5))
auto_scale_lr = dict(base_batch_size=4)
randomness = dict(seed=0)
