"""Building blocks of the backbones, one module per concept: norms, activations, token mixers,
and the blocks and stages made of them."""
from .activations import StarReLU
from .blocks import (
    DOWNSAMPLING_GEOMETRY,
    STEM_GEOMETRY,
    ChannelScale,
    ConvEmbedding,
    ConvMlp,
    DeployPoolFormerBlock,
    MetaFormerBlock,
    MetaFormerStage,
    PositionEmbedding,
    downsampling,
    fused_linear_available,
    stem,
    token_grids,
)
from .mixers import (
    TOKEN_MIXER_PRESETS,
    TOKEN_MIXERS,
    Attention,
    DepthwiseConvMixer,
    IdentityMixer,
    PoolingMixer,
    RandomMixing,
    SepConv,
    SpatialFC,
    build_token_mixer,
    resize_token_matrix,
    token_mixer_cfg,
)
from .norms import (
    ChannelLayerNorm,
    ModifiedLayerNorm,
    build_norm,
    channel_norm_cfg,
    group_norm_1_channels_last,
    group_norm_1_moments,
    group_norm_1_to_nchw,
    is_group_norm_1,
    normalize_tokens,
)
from .scratch import ScratchBuffers

__all__ = [
    'StarReLU', 'DOWNSAMPLING_GEOMETRY', 'STEM_GEOMETRY', 'ChannelScale', 'ConvEmbedding',
    'ConvMlp', 'DeployPoolFormerBlock', 'MetaFormerBlock', 'MetaFormerStage',
    'PositionEmbedding', 'downsampling', 'fused_linear_available', 'stem', 'token_grids',
    'TOKEN_MIXER_PRESETS', 'TOKEN_MIXERS', 'Attention', 'DepthwiseConvMixer', 'IdentityMixer',
    'PoolingMixer', 'RandomMixing', 'SepConv', 'SpatialFC', 'build_token_mixer',
    'resize_token_matrix', 'token_mixer_cfg', 'ChannelLayerNorm', 'ModifiedLayerNorm',
    'build_norm', 'channel_norm_cfg', 'group_norm_1_channels_last', 'group_norm_1_moments',
    'group_norm_1_to_nchw', 'is_group_norm_1', 'normalize_tokens', 'ScratchBuffers'
]
