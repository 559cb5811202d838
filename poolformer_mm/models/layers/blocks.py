"""The MetaFormer block and stage, and what they are built from: patch embeddings, position
embedding, layer scale and the channel MLP.

One block class serves PoolFormer and the MetaFormer baselines (timm builds both the same way):

    x = res_scale1(x) + drop_path(layer_scale1(token_mixer(norm1(x))))
    x = res_scale2(x) + drop_path(layer_scale2(mlp(norm2(x))))

PoolFormer: GroupNorm(1) norms, GELU MLP with biases, layer scales, no res scale. The baselines:
bias-free norms (eps 1e-6), a StarReLU MLP without biases, and a res scale in the last two stages.

A :class:`MetaFormerStage` runs its blocks in one of two layouts:

* NCHW (the paper's formulation; every block);
* (N, H, W, C) tokens, for stages of PoolFormer blocks (pooling mixer, GroupNorm(1), layer
  scales). Why it is faster on a CPU (measured with tools/analysis/benchmark.py; see the
  README): the 1x1 convolutions of the MLP, which hold nearly all the MACs, become plain matrix
  products (``F.linear``) on that layout, about 2.5x faster than oneDNN's NCHW 1x1 convolution;
  the average pooling runs on the channels-last view, about 6x faster than on NCHW; GroupNorm(1)
  normalises over all of a sample, whatever its layout. And since the pooling of a constant is
  that constant, ``pool(a*x + b) - (a*x + b) = a * (pool(x) - x)``: the norm's bias never
  reaches the mixer branch and its scale merges with the layer scale.

  :meth:`MetaFormerBlock.forward_tokens` folds the norms' affine maps and the layer scales into
  per-channel scales and the MLP weights at every call (small products of parameters,
  differentiated by autograd), so it trains: gradients equal the NCHW form's up to rounding, and
  every parameter gets one (DDP needs that).

:meth:`MetaFormerStage.switch_to_deploy` replaces each PoolFormer block by a
:class:`DeployPoolFormerBlock`, which folds them once, into buffers, and needs only the norms'
statistics. Inference only. On a CPU a folded block allocates one tensor per call, its output:
the mixer's result becomes the residual stream in place, the MLP's output is accumulated into it
(``addmm_``), and the normalised tokens and hidden activations are scratch tensors kept between
calls (:class:`~.scratch.ScratchBuffers`), since fresh large tensors cost a page fault per 4 KiB
there. Under bf16 autocast fc1 and GELU run as oneDNN's fused kernel. Fold in fp32 or bf16:
fp16 would flush the folded layer scales (1e-5, 1e-6) towards zero.
"""
import functools
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_activation_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model.weight_init import trunc_normal_init
from torch import Tensor

from ...utils.cpu_flags import BF16_CPU_FLAGS, cpu_flags
from .mixers import PoolingMixer
from .norms import build_norm, group_norm_1_moments, is_group_norm_1, normalize_tokens
from .scratch import ScratchBuffers


# ---------------------------------------------------------------------------------- embeddings
class ConvEmbedding(nn.Module):
    """A strided convolution that changes resolution and width, with an optional norm after it
    (a stem) or before it (between stages, where the previous stage ends on an un-normalised
    residual stream).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Kernel size.
        stride (int): Stride, i.e. the downsampling factor.
        padding (int): Zero padding.
        norm_cfg (dict, optional): Norm config (see :func:`~.norms.build_norm`). Default: None.
        norm_first (bool): Normalise the input rather than the output. Default: False.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, norm_cfg: Optional[dict] = None, norm_first: bool = False):
        super().__init__()
        self.norm_first = norm_first
        norm = None if norm_cfg is None else build_norm(
            norm_cfg, in_channels if norm_first else out_channels)
        # registration order is parameter order, which saved optimizer states follow
        if norm_first:
            self.norm = norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding)
        if not norm_first:
            self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is None:
            return self.conv(x)
        return self.conv(self.norm(x)) if self.norm_first else self.norm(self.conv(x))

    def store_weights_channels_last(self) -> None:
        """Keep the convolution's weight channels-last, the layout of its inputs on the
        token-layout path; otherwise every call reorders it."""
        self.conv.weight.data = self.conv.weight.data.contiguous(memory_format=torch.channels_last)


# Kernel, stride and padding of the stem and of the downsampling before stages 2-4
# (the same in PoolFormer and the MetaFormer baselines)
STEM_GEOMETRY = (7, 4, 2)
DOWNSAMPLING_GEOMETRY = (3, 2, 1)


def stem(in_channels: int, out_channels: int, norm_cfg: Optional[dict] = None) -> ConvEmbedding:
    """Conv 7x7 / stride 4 / padding 2, then the norm if one is given."""
    return ConvEmbedding(in_channels, out_channels, *STEM_GEOMETRY, norm_cfg=norm_cfg)


def downsampling(in_channels: int, out_channels: int,
                 norm_cfg: Optional[dict] = None) -> ConvEmbedding:
    """The norm if one is given, then conv 3x3 / stride 2 / padding 1."""
    return ConvEmbedding(in_channels, out_channels, *DOWNSAMPLING_GEOMETRY, norm_cfg=norm_cfg,
                         norm_first=True)


def token_grids(img_size: Union[int, Sequence[int]], num_stages: int) -> list:
    """Token grid ``(h, w)`` of each stage for an input of ``img_size``."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    grids = []
    for i in range(num_stages):
        kernel, stride, padding = STEM_GEOMETRY if i == 0 else DOWNSAMPLING_GEOMETRY
        h, w = ((side + 2 * padding - kernel) // stride + 1 for side in (h, w))
        grids.append((h, w))
    return grids


class PositionEmbedding(nn.Module):
    """Learnable absolute position embedding added to an NCHW feature map.

    The paper's attention hybrids add one at the start of their first attention stage, since
    self-attention alone does not know where a token is. It is learned for the token grid of the
    pre-training input (``base_size``); at any other grid it is resized bicubically to the feature
    map, so the backbone takes any input size.

    Args:
        dim (int): Channels.
        base_size (int | tuple[int, int]): Token grid ``(h, w)`` the embedding is learned for.
    """

    def __init__(self, dim: int, base_size: Union[int, Sequence[int]]):
        super().__init__()
        h, w = (base_size, base_size) if isinstance(base_size, int) else base_size
        self.base_size = (int(h), int(w))
        # Zeros, as the official hybrids: training starts from a position-agnostic stage.
        self.weight = nn.Parameter(torch.zeros(1, dim, *self.base_size))

    def forward(self, x: Tensor) -> Tensor:
        embedding = self.weight
        if tuple(x.shape[-2:]) != self.base_size:
            embedding = F.interpolate(embedding, size=x.shape[-2:], mode='bicubic',
                                      align_corners=False)
        return x + embedding

    def extra_repr(self) -> str:
        return f'base_size={self.base_size}'


# ---------------------------------------------------------------------------------- block parts
class ChannelScale(nn.Module):
    """Learnable per-channel scale of an NCHW tensor (layer scale, res scale)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view(-1, 1, 1)


class ConvMlp(nn.Module):
    """Channel MLP on an NCHW tensor: 1x1 conv -> activation -> 1x1 conv.

    Args:
        dim (int): Input and output channels.
        hidden_dim (int): Hidden channels.
        act_cfg (dict): Activation config (a class works as ``type``). Default: GELU.
        bias (bool): Whether the convolutions have a bias. Default: True.
    """

    def __init__(self, dim: int, hidden_dim: int, act_cfg: dict = dict(type='GELU'),
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=bias)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=bias)

    def init_weights(self) -> None:
        # The reference implementation initialises the MLP with a truncated normal (std 0.02).
        for conv in (self.fc1, self.fc2):
            trunc_normal_init(conv, std=0.02, bias=0.)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has one flag per device kind
        return (torch.is_autocast_cpu_enabled() if device_type == 'cpu'
                else torch.is_autocast_enabled())


# ---------------------------------------------------------------------------------- block
class MetaFormerBlock(nn.Module):
    """One MetaFormer block with a swappable token mixer.

    ``x = res_scale1(x) + drop_path(layer_scale1(token_mixer(norm1(x))))``
    ``x = res_scale2(x) + drop_path(layer_scale2(mlp(norm2(x))))``

    A layer scale multiplies the branch, a res scale the shortcut (the MetaFormer baselines found
    it trains deep stages more stably); either is an identity when its init value is None.

    Args:
        dim (int): Channels.
        token_mixer (nn.Module): Any module mapping (N, C, H, W) to the same shape.
        norm_cfg (dict): Norm config for NCHW maps (see :func:`~.norms.build_norm`; mmcv's 'LN'
            is refused: it normalises the width; pass a channel LayerNorm class as ``type``
            instead, PoolFormer maps 'LN' to one). Default: GroupNorm with one group.
        mlp_ratio (float): Hidden width of the MLP relative to ``dim``. Default: 4.
        act_cfg (dict): Activation of the MLP. Default: GELU.
        mlp_bias (bool): Biases in the MLP. Default: True.
        drop_path (float): Stochastic depth rate of both residual branches. Default: 0.
        layer_scale_init_value (float, optional): Initial layer scale; None disables it.
            Default: 1e-5.
        res_scale_init_value (float, optional): Initial res scale; None disables it.
            Default: None.
    """

    def __init__(self,
                 dim: int,
                 token_mixer: nn.Module,
                 norm_cfg: dict = dict(type='GN', num_groups=1),
                 mlp_ratio: float = 4.,
                 act_cfg: dict = dict(type='GELU'),
                 mlp_bias: bool = True,
                 drop_path: float = 0.,
                 layer_scale_init_value: Optional[float] = 1e-5,
                 res_scale_init_value: Optional[float] = None):
        super().__init__()
        # Registration order is parameter order, which the optimizer states of saved
        # checkpoints follow: PoolFormer's blocks never have a res scale and the MetaFormer
        # baselines' never a layer scale, so this order is the one each had before.
        self.norm1 = build_norm(norm_cfg, dim)
        self.token_mixer = token_mixer
        self.res_scale1 = self._scale(dim, res_scale_init_value)
        self.norm2 = build_norm(norm_cfg, dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_cfg, bias=mlp_bias)
        self.res_scale2 = self._scale(dim, res_scale_init_value)
        self.layer_scale1 = self._scale(dim, layer_scale_init_value)
        self.layer_scale2 = self._scale(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @staticmethod
    def _scale(dim: int, init_value: Optional[float]) -> nn.Module:
        return nn.Identity() if init_value is None else ChannelScale(dim, init_value)

    def forward(self, x: Tensor) -> Tensor:
        x = self.res_scale1(x) + self.drop_path(self.layer_scale1(self.token_mixer(self.norm1(x))))
        x = self.res_scale2(x) + self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))
        return x

    # ------------------------------------------------------------ token layout
    @property
    def supports_token_layout(self) -> bool:
        """True for a PoolFormer block: pooling mixer, GroupNorm(1) norms with affine, layer
        scales, no res scale, an MLP with biases."""
        return (isinstance(self.token_mixer, PoolingMixer)
                and is_group_norm_1(self.norm1) and is_group_norm_1(self.norm2)
                and isinstance(self.layer_scale1, ChannelScale)
                and isinstance(self.layer_scale2, ChannelScale)
                and isinstance(self.res_scale1, nn.Identity)
                and isinstance(self.res_scale2, nn.Identity)
                and self.mlp.fc1.bias is not None and self.mlp.fc2.bias is not None)

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """This block on (N, H, W, C) tokens (needs :attr:`supports_token_layout`); trains."""
        norm1, norm2, mlp = self.norm1, self.norm2, self.mlp
        # pool(a*x + b) - (a*x + b) = a * (pool(x) - x): norm1's weight joins the layer scale and
        # its bias cancels. The bias stays in the graph with a zero factor, because DDP expects a
        # gradient for every parameter (the NCHW formulation's is 0 up to rounding).
        mixer_scale = norm1.weight * self.layer_scale1.scale + 0 * norm1.bias
        mixed = self.token_mixer.forward_tokens(normalize_tokens(tokens, norm1.eps))
        # norm2's affine map folds into fc1: a (4C x C) product per step instead of passes over
        # the activations, forward and backward
        fc1_weight = mlp.fc1.weight.flatten(1)
        fc1 = fc1_weight * norm2.weight, mlp.fc1.bias + fc1_weight @ norm2.bias
        fc2 = mlp.fc2.weight.flatten(1), mlp.fc2.bias
        scale2 = self.layer_scale2.scale
        if isinstance(self.drop_path, nn.Identity):
            tokens = torch.addcmul(tokens, mixed, mixer_scale)
            hidden = mlp.act(F.linear(normalize_tokens(tokens, norm2.eps), *fc1))
            if _autocast_enabled(tokens.device.type):
                # keep the residual stream in full precision, and the layer scale (1e-5 or
                # 1e-6) out of half-precision weights, where it would underflow
                return torch.addcmul(tokens, F.linear(hidden, *fc2), scale2)
            # layer_scale2 folds into fc2, and the residual add into the matrix product
            flat = tokens.view(-1, tokens.shape[-1])
            out = torch.addmm(flat, hidden.view(flat.shape[0], -1),
                              (fc2[0] * scale2[:, None]).t())
            return out.add_(fc2[1] * scale2).view(tokens.shape)
        tokens = tokens + self.drop_path(mixed * mixer_scale)
        hidden = mlp.act(F.linear(normalize_tokens(tokens, norm2.eps), *fc1))
        return tokens + self.drop_path(F.linear(hidden, *fc2) * scale2)


# ---------------------------------------------------------------------------------- deploy form
def cpu_lacks_bf16_units() -> bool:
    """Whether this CPU's flags are known and list no bf16 units."""
    flags = cpu_flags()
    return flags is not None and not flags.intersection(BF16_CPU_FLAGS)


@functools.lru_cache(maxsize=None)
def fused_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch has oneDNN's fused linear + GELU kernel for ``dtype`` and it agrees
    with the unfused ops (folded blocks use it for fc1 under bf16 autocast). It is private
    (``torch.ops.mkldnn._linear_pointwise``), so a torch without it, or one where it
    misbehaves, gets the unfused path (with a warning) instead of an error."""
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    try:
        # checked whatever the caller's autocast or grad mode, since the answer is kept
        with torch.no_grad(), torch.autocast('cpu', enabled=False):
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(5, 8, generator=generator).to(dtype)
            weight = torch.randn(16, 8, generator=generator).to(dtype)
            bias = torch.randn(16, generator=generator).to(dtype)
            hidden = torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu', [], 'none')
            expected = F.gelu(F.linear(x.float(), weight.float(), bias.float()))
            agree = torch.allclose(hidden.float(), expected, rtol=tolerance, atol=tolerance)
        reason = 'it disagrees with the unfused ops'
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        if dtype != torch.float32 and cpu_lacks_bf16_units():
            # oneDNN has no low-precision kernels to fuse on such a CPU; the tools already say
            # that bf16 is emulated there, and the unfused path gives the same outputs
            return False
        agree, reason = False, f'it is missing ({error})'
    if not agree:
        warnings.warn(f"oneDNN's fused linear + GELU kernel ({dtype}) is not used: {reason}. "
                      'Deployed PoolFormer blocks run it unfused: same outputs, slower on a '
                      'CPU.')
    return agree


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The low-precision dtype of the autocast region around this call, or None outside one."""
    if not _autocast_enabled(device_type):
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return (torch.get_autocast_cpu_dtype() if device_type == 'cpu'
                else torch.get_autocast_gpu_dtype())


def _allocating_ops_only(tokens: Tensor) -> bool:
    """Whether ``tokens`` must go through ops without ``out=`` or in-place forms: under
    autograd, and inside functorch transforms (``torch.vmap``), which have no rules for them."""
    if torch.is_grad_enabled() and tokens.requires_grad:
        return True
    is_wrapped = getattr(getattr(torch._C, '_functorch', None), 'is_functorch_wrapped_tensor',
                         None)
    return bool(is_wrapped is not None and is_wrapped(tokens))


def _activate_in_place(act: nn.Module, hidden: Tensor) -> Tensor:
    """``act(hidden)``, written over ``hidden`` where the activation has an in-place form."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_(hidden, approximate=act.approximate)
    return act(hidden)


class DeployPoolFormerBlock(nn.Module):
    """A PoolFormer block with norm affines and layer scales folded into the weights.

    ``x + s1 * (pool(x̂) - x̂)`` then ``x + fc2'(act(fc1'(x̂)))``, where ``x̂`` is the
    unscaled GroupNorm(1) output, ``s1 = layer_scale1 * norm1.weight``,
    ``fc1' = fc1 · diag(norm2.weight)`` with bias ``fc1.bias + fc1 · norm2.bias`` and
    ``fc2' = diag(layer_scale2) · fc2``. Works on (N, H, W, C) tokens; inference only.

    Pooling keeps constants, so ``pool(x̂) - x̂ = (pool(x) - x) / std(x)``: the mixer needs
    only the statistics of ``x``, never the normalised tensor.

    Without autograd on a CPU, the block allocates one tensor per call, its output: the mixer's
    result becomes the residual stream in place, the MLP accumulates into it, and the normalised
    tokens and hidden activations live in ``scratch`` (see :mod:`.scratch` for why).

    Args:
        block (MetaFormerBlock): A block that :attr:`~MetaFormerBlock.supports_token_layout`.
        scratch (ScratchBuffers, optional): Scratch tensors shared with the other folded blocks
            of the backbone. Default: None (a set of its own).
    """

    supports_token_layout = True

    def __init__(self, block: MetaFormerBlock, scratch: Optional[ScratchBuffers] = None):
        super().__init__()
        norm1, norm2, mlp = block.norm1, block.norm2, block.mlp
        with torch.no_grad():
            self.register_buffer('mixer_scale', block.layer_scale1.scale * norm1.weight)
            fc1 = mlp.fc1.weight.flatten(1)
            self.register_buffer('fc1_weight', fc1 * norm2.weight)
            self.register_buffer('fc1_bias', mlp.fc1.bias + fc1 @ norm2.bias)
            scale2 = block.layer_scale2.scale
            self.register_buffer('fc2_weight', mlp.fc2.weight.flatten(1) * scale2[:, None])
            self.register_buffer('fc2_bias', mlp.fc2.bias * scale2)
        self.eps1, self.eps2 = norm1.eps, norm2.eps
        self.token_mixer = block.token_mixer
        self.act = mlp.act
        # a plain attribute: neither a buffer nor in the state dict
        self.scratch = ScratchBuffers() if scratch is None else scratch

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        low_precision = autocast_dtype(tokens.device.type)
        if low_precision is not None:
            with torch.autocast(tokens.device.type, enabled=False):
                # a stage's convolution hands its first block low-precision tokens
                return self._forward_mixed_precision(tokens.float(), low_precision)
        if _allocating_ops_only(tokens):
            tokens, normed = self._mix_and_normalize(tokens)
            hidden = self.act(F.linear(normed, self.fc1_weight, self.fc1_bias))
            return tokens + F.linear(hidden, self.fc2_weight, self.fc2_bias)
        tokens, normed = self._mix_and_normalize(tokens, in_place=True)
        hidden = self._fc1_and_activation(normed, self.fc1_weight, self.fc1_bias)
        # tokens is this block's own fresh tensor: accumulate the MLP into it in place
        flat = tokens.view(-1, tokens.shape[-1])
        flat.add_(self.fc2_bias).addmm_(hidden, self.fc2_weight.t())
        return tokens

    def _mix_and_normalize(self, tokens: Tensor, normed_dtype: Optional[torch.dtype] = None,
                           in_place: bool = False):
        """The mixer half of the block, then the MLP's input: ``(tokens, norm2(tokens))``, the
        latter in ``normed_dtype`` (default: that of ``tokens``). ``in_place`` (no autograd):
        the new tokens take the mixer output's memory and, on a CPU, the normalised ones are a
        scratch tensor."""
        n, channels = tokens.shape[0], tokens.shape[-1]
        _, inv_std = group_norm_1_moments(tokens, self.eps1)
        mixer_scale = (inv_std[:, None] * self.mixer_scale).view(n, 1, 1, channels)
        mixed = self.token_mixer.forward_tokens(tokens)
        # PoolingMixer's own forward_tokens returns a fresh tensor (a subclass's might not), and
        # it can hold the result if it has the result's dtype
        result_dtype = torch.promote_types(torch.promote_types(tokens.dtype, mixed.dtype),
                                           mixer_scale.dtype)
        reuse_mixed = (in_place and mixed.is_contiguous() and mixed.dtype == result_dtype
                       and type(self.token_mixer).forward_tokens is PoolingMixer.forward_tokens)
        tokens = torch.addcmul(tokens, mixed, mixer_scale, out=mixed if reuse_mixed else None)
        if in_place and not tokens.is_contiguous():
            tokens = tokens.contiguous()  # the MLP accumulates into a flat view of it
        mean, inv_std = group_norm_1_moments(tokens, self.eps2)
        # (x - mean) * inv_std in one pass. The per-sample factors are repeated along the
        # channels: CPU kernels vectorise a broadcast over the innermost dimension only (one
        # value per sample ran 3x slower at 128x128x64)
        shift, scale = (torch.stack([-mean * inv_std, inv_std], 1)[:, :, None]
                        .expand(n, 2, channels).contiguous().view(n, 2, 1, 1, channels)
                        .unbind(1))
        normed_dtype = tokens.dtype if normed_dtype is None else normed_dtype
        if in_place and tokens.device.type == 'cpu':
            # computed in the tokens' precision and rounded once into the scratch tensor
            normed = self.scratch.get('normed', tokens.shape, normed_dtype, tokens.device)
            return tokens, torch.addcmul(shift, tokens, scale, out=normed)
        return tokens, torch.addcmul(shift, tokens, scale).to(normed_dtype)

    def _fc1_and_activation(self, normed: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``act(fc1(normed))`` as (tokens, hidden) rows, for inference: on a CPU into a scratch
        tensor, activated in place."""
        normed = normed.reshape(-1, normed.shape[-1])
        if normed.device.type != 'cpu':  # the device's caching allocator reuses memory there
            return self.act(F.linear(normed, weight, bias))
        hidden = self.scratch.get('hidden', (normed.shape[0], weight.shape[0]), normed.dtype,
                                  normed.device)
        return _activate_in_place(self.act, torch.addmm(bias, normed, weight.t(), out=hidden))

    def _fused_gelu_linear(self, normed: Tensor, dtype: torch.dtype) -> bool:
        return (normed.device.type == 'cpu' and dtype == torch.bfloat16
                and type(self.act) is nn.GELU and self.act.approximate == 'none'
                and torch.backends.mkldnn.is_available() and fused_linear_available(dtype))

    def _forward_mixed_precision(self, tokens: Tensor, dtype: torch.dtype) -> Tensor:
        """The block under autocast: the two matrix products (nearly all the MACs) in ``dtype``
        with weights cast once, not at every call; the residual stream, the statistics and the
        mixer in fp32, so the rounding of 12 to 36 residual additions does not pile up."""
        allocating = _allocating_ops_only(tokens)
        tokens, normed = self._mix_and_normalize(tokens, dtype, in_place=not allocating)
        fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc2_row_scale = self._weights_in(dtype)
        if allocating:
            hidden = self.act(F.linear(normed, fc1_weight, fc1_bias))
        elif self._fused_gelu_linear(normed, dtype):
            # in bf16 oneDNN's fused kernel beats a product into scratch and a GELU pass
            # (1.6 against 2.0 ms for stage 3's fc1 of S12 at 512x512, 2 threads)
            hidden = torch.ops.mkldnn._linear_pointwise(normed, fc1_weight, fc1_bias, 'gelu',
                                                        [], 'none')
        else:
            hidden = self._fc1_and_activation(normed, fc1_weight, fc1_bias)
        out = F.linear(hidden, fc2_weight, fc2_bias).view(tokens.shape)
        if fc2_row_scale is not None:
            out = out.float() * fc2_row_scale
        if allocating:
            return tokens + out
        return tokens.add_(out)

    def _weights_in(self, dtype: torch.dtype) -> tuple:
        """The folded MLP weights in ``dtype``, cast on first use and kept until the buffers
        change (``load_state_dict``, ``.to()``). fp16 cannot hold the folded layer scales
        (1e-5 to 1e-6 times weights of about 0.02 are below its normal range), so in fp16
        fc2's rows are scaled to a maximum of 1 and the scale is applied to the fp32 output."""
        key = (dtype, ) + tuple((buffer.data_ptr(), buffer._version) for buffer in (
            self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias))
        cached = self.__dict__.get('_weights_cache')
        if cached is None or cached[0] != key:
            fc2_weight, fc2_bias, row_scale = self.fc2_weight, self.fc2_bias, None
            if dtype == torch.float16:
                row_scale = fc2_weight.abs().amax(1).clamp_min(1e-30)
                fc2_weight, fc2_bias = fc2_weight / row_scale[:, None], fc2_bias / row_scale
            weights = (self.fc1_weight.to(dtype), self.fc1_bias.to(dtype), fc2_weight.to(dtype),
                       fc2_bias.to(dtype), row_scale)
            # a plain attribute, outside the state dict and the module's buffers
            self.__dict__['_weights_cache'] = cached = (key, weights)
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        """NCHW in, NCHW out, for a stage that runs NCHW."""
        return self.forward_tokens(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------- stage
class MetaFormerStage(nn.Module):
    """An optional downsampling layer, an optional position embedding, then MetaFormer blocks.

    The stage owns how its blocks run: in NCHW or in (N, H, W, C) token layout (when every block
    :attr:`~MetaFormerBlock.supports_token_layout`; the output is then a channels-last NCHW
    map), with or without gradient checkpointing, and folded for deployment. Switch with
    :meth:`set_token_layout`, :meth:`set_grad_checkpointing` and :meth:`switch_to_deploy`.

    Args:
        downsample (nn.Module, optional): Changes resolution and width first.
        blocks (Sequence[nn.Module]): The stage's blocks, run in turn.
        pos_embed (nn.Module, optional): Added to the input of the first block (the paper's
            attention hybrids have one at the start of their first attention stage).
            Default: None.
        token_layout (bool): Run in token layout where the blocks allow it. Default: False.
        grad_checkpointing (bool): Gradient checkpointing per block. Default: False.
    """

    def __init__(self, downsample: Optional[nn.Module], blocks: Sequence[nn.Module],
                 pos_embed: Optional[nn.Module] = None, token_layout: bool = False,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.downsample = downsample
        self.pos_embed = pos_embed
        self.blocks = nn.ModuleList(blocks)
        self.set_token_layout(token_layout)
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def token_layout(self) -> bool:
        """Whether the blocks run on (N, H, W, C) tokens."""
        return self._token_layout

    @property
    def grad_checkpointing(self) -> bool:
        """Whether each block's activations are recomputed in the backward pass."""
        return self._grad_checkpointing

    def set_token_layout(self, enable: bool = True) -> 'MetaFormerStage':
        """Run the blocks in (N, H, W, C) token layout if ``enable`` and every block supports
        it (same outputs and gradients), in NCHW otherwise."""
        self._token_layout = bool(enable) and all(
            getattr(block, 'supports_token_layout', False) for block in self.blocks)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> 'MetaFormerStage':
        """Recompute each block's activations in the backward pass instead of keeping them:
        less memory, a second forward per block; outputs and gradients are unchanged."""
        self._grad_checkpointing = bool(enable)
        return self

    def switch_to_deploy(self, scratch: Optional[ScratchBuffers] = None) -> 'MetaFormerStage':
        """Fold every PoolFormer block (:class:`DeployPoolFormerBlock`; inference only, same
        outputs) and run in token layout where possible. The folded blocks share ``scratch``
        (default: a new set for this stage)."""
        scratch = ScratchBuffers() if scratch is None else scratch
        for j, block in enumerate(self.blocks):
            if isinstance(block, MetaFormerBlock) and block.supports_token_layout:
                self.blocks[j] = DeployPoolFormerBlock(block, scratch)
        if isinstance(self.downsample, ConvEmbedding):
            self.downsample.store_weights_channels_last()
        return self.set_token_layout(True)

    def forward(self, x: Tensor) -> Tensor:
        if not self._token_layout:
            x = x.contiguous()  # the stage before may have handed over a channels-last map
        if self.downsample is not None:
            x = self.downsample(x)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        if self._token_layout:
            x = x.permute(0, 2, 3, 1)
            if not x.is_contiguous():
                x = x.contiguous()
        for block in self.blocks:
            run = block.forward_tokens if self._token_layout else block
            if self._grad_checkpointing and x.requires_grad:
                x = cp.checkpoint(run, x, use_reentrant=False)
            else:
                x = run(x)
        return x.permute(0, 3, 1, 2) if self._token_layout else x
