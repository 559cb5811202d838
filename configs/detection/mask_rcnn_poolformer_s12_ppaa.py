# Mask R-CNN with the PoolFormer paper's [Pool, Pool, Attention, Attention] S12 hybrid (Table 5)
# on COCO: attention in the last two stages, a position embedding at the start of stage 3 and a
# channel LayerNorm in every stage, as the released ImageNet model metaformer_ppaa_s12_224.
_base_ = './mask_rcnn_poolformer_s12.py'

checkpoint_file = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/metaformer_ppaa_s12_224.pth.tar'  # noqa: E501
model = dict(
    backbone=dict(
        token_mixers=('pool', 'pool', 'attn', 'attn'),
        norm_cfg=dict(type='LN'),  # the default with attention stages; the checkpoint needs it
        init_cfg=dict(checkpoint=checkpoint_file)))
