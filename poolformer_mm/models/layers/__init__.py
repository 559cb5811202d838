from .metaformer import ChannelScale, ConvMlp, ConvPatchEmbed, MetaFormerBlock
from .metaformer_v2 import (V2_TOKEN_MIXERS, Attention, ChannelLayerNorm, Downsampling,
                            MetaFormerV2Block, ModifiedLayerNorm, RandomMixing, SepConv, StarReLU,
                            Stem, build_v2_token_mixer)
from .token_mixers import (TOKEN_MIXERS, DepthwiseConvMixer, IdentityMixer, PoolingMixer,
                           build_token_mixer)

__all__ = [
    'ChannelScale', 'ConvMlp', 'ConvPatchEmbed', 'MetaFormerBlock', 'TOKEN_MIXERS',
    'DepthwiseConvMixer', 'IdentityMixer', 'PoolingMixer', 'build_token_mixer', 'V2_TOKEN_MIXERS',
    'Attention', 'ChannelLayerNorm', 'Downsampling', 'MetaFormerV2Block', 'ModifiedLayerNorm',
    'RandomMixing', 'SepConv', 'StarReLU', 'Stem', 'build_v2_token_mixer'
]
