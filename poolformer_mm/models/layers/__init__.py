from .metaformer import ChannelScale, ConvMlp, ConvPatchEmbed, MetaFormerBlock
from .token_mixers import (TOKEN_MIXERS, DepthwiseConvMixer, IdentityMixer, PoolingMixer,
                           build_token_mixer)

__all__ = [
    'ChannelScale', 'ConvMlp', 'ConvPatchEmbed', 'MetaFormerBlock', 'TOKEN_MIXERS',
    'DepthwiseConvMixer', 'IdentityMixer', 'PoolingMixer', 'build_token_mixer'
]
