# Mask R-CNN PoolFormer-S12 trained from scratch on the synthetic toy set written by
# python tools/dataset_converters/make_toy_data.py coco data/toy_coco
# (128x128 images of circles, squares and triangles, with instance masks): minutes on a 2-core CPU.
_base_ = '../mask_rcnn_poolformer_s12.py'

data_root = 'data/toy_coco/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
image_size = (128, 128)
max_epochs = 20

model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(bbox_head=dict(num_classes=3), mask_head=dict(num_classes=3)),
    # Few objects per image: fewer proposals, sampled RoIs and detections. RoIAlign's backward
    # pass dominates a CPU training step, so this makes the toy run about 3x faster.
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=200),
                   rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline,
                 ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/')))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline,
                 ann_file='annotations/instances_val2017.json', data_prefix=dict(img='val2017/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# From scratch on 48 images: batch 2 (more updates per minute), higher lr, short warm-up,
# one step near the end.
optim_wrapper = dict(optimizer=dict(lr=3e-4), clip_grad=dict(max_norm=10.))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=48),
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=max_epochs, milestones=[16], gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(logger=dict(interval=6), checkpoint=dict(interval=max_epochs // 2))
auto_scale_lr = dict(base_batch_size=2)
randomness = dict(seed=0)
