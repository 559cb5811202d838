from .metaformer import (ChannelScale, ConvMlp, ConvPatchEmbed, MetaFormerBlock,
                         PositionEmbedding)
from .metaformer_v2 import (V2_TOKEN_MIXERS, Attention, ChannelLayerNorm, Downsampling,
                            MetaFormerV2Block, ModifiedLayerNorm, RandomMixing, SepConv, StarReLU,
                            Stem, build_v2_token_mixer)
from .token_mixers import (TOKEN_MIXERS, DepthwiseConvMixer, IdentityMixer, PoolingMixer,
                           SpatialFC, build_token_mixer, random_mixing, resize_token_matrix,
                           self_attention)

__all__ = [
    'ChannelScale', 'ConvMlp', 'ConvPatchEmbed', 'MetaFormerBlock', 'PositionEmbedding',
    'TOKEN_MIXERS', 'DepthwiseConvMixer', 'IdentityMixer', 'PoolingMixer', 'SpatialFC',
    'build_token_mixer', 'random_mixing', 'resize_token_matrix', 'self_attention',
    'V2_TOKEN_MIXERS',
    'Attention', 'ChannelLayerNorm', 'Downsampling', 'MetaFormerV2Block', 'ModifiedLayerNorm',
    'RandomMixing', 'SepConv', 'StarReLU', 'Stem', 'build_v2_token_mixer'
]
