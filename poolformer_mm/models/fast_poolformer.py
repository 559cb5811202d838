"""A faster formulation of PoolFormer with the same weights and outputs.

Why it is faster on a CPU (measured with tools/analysis/benchmark.py; see the README):

* Tokens stay in (N, H, W, C) layout inside a stage. The 1x1 convolutions of the MLP, which hold
  nearly all the MACs, become plain matrix products (``F.linear``) on that layout, about 2.5x
  faster than oneDNN's NCHW 1x1 convolution on CPU; the 3x3 average pooling runs on the
  channels-last view, about 6x faster than on NCHW.
* GroupNorm with one group normalises over (C, H, W) per sample, which is a LayerNorm over the
  last three dims of the token layout; its per-channel affine is applied separately.
* With ``count_include_pad=False`` the pooling of a constant is that constant, so
  ``pool(a*x + b) - (a*x + b) = a * (pool(x) - x)``: the norm's bias never reaches the mixer
  branch and its scale merges with the layer scale.

Two forms:

* :func:`stage_forward` computes a stage of ordinary :class:`MetaFormerBlock` s this way. It
  folds the norms' affine maps and the layer scales into per-channel scales and the MLP
  weights at every call (small products of parameters, differentiated by autograd), so it
  trains: gradients equal the plain form's up to rounding, and every parameter gets one (DDP
  needs that).
* :class:`DeployPoolFormerBlock` (built by :func:`switch_to_deploy`) folds them once, into
  buffers, and needs only the norms' statistics. Inference only. On a CPU it runs the MLP with
  oneDNN's fused linear kernels (bias + GELU after fc1, bias + residual add after fc2): the
  kernels ``torch.compile`` emits, the same outputs up to rounding, and two fewer passes over
  the largest activations per block. Elsewhere it uses ``F.linear`` and ``addmm``. Fold in
  fp32 or bf16: fp16 would flush the folded layer scales (1e-5, 1e-6) towards zero.
"""
import functools
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor

from .layers import ChannelScale, MetaFormerBlock, PoolingMixer


def can_run_fast(block: nn.Module) -> bool:
    """True for a PoolFormer block: pooling mixer, one-group GroupNorms, layer scales."""
    if isinstance(block, DeployPoolFormerBlock):
        return True
    return (isinstance(block, MetaFormerBlock) and isinstance(block.token_mixer, PoolingMixer)
            and all(isinstance(n, nn.GroupNorm) and n.num_groups == 1 and n.affine
                    for n in (block.norm1, block.norm2))
            and all(isinstance(s, ChannelScale)
                    for s in (block.layer_scale_1, block.layer_scale_2)))


def _normalize(tokens: Tensor, eps: float) -> Tensor:
    # GroupNorm(1) statistics over all of (H, W, C): the layout does not matter, so normalise the
    # flat memory as one group (faster than layer_norm over three dims at batch 1).
    flat = tokens.reshape(tokens.shape[0], 1, -1)  # a view for the usual contiguous tokens
    return F.group_norm(flat, 1, eps=eps).view(tokens.shape)


# Elements per sample from which several multi-threaded reductions beat GroupNorm's single
# call (measured on a 2-core CPU: 2.8x faster at 2**20, slower below about 2**18)
_THREADED_STATISTICS_MIN_SIZE = 1 << 19


def _moments(tokens: Tensor, eps: float) -> tuple:
    """Per-sample mean and ``1 / sqrt(var + eps)`` over all of (H, W, C), as GroupNorm(1) has."""
    n = tokens.shape[0]
    if tokens.device.type == 'cpu' and tokens[0].numel() >= _THREADED_STATISTICS_MIN_SIZE:
        # GroupNorm's CPU kernel runs on one thread per sample; these reductions use every
        # thread. They sum along each token's channels, then in fp64 across tokens: one sum
        # over a whole sample would lose digits.
        rows = tokens.reshape(n, -1, tokens.shape[-1])
        count = rows.shape[1] * rows.shape[2]
        mean = rows.sum(2).double().sum(1) / count
        mean_square = torch.linalg.vector_norm(rows, dim=2).double().square().sum(1) / count
        var = mean_square - mean.square()
        # E[x^2] - mean^2 cancels when |mean| >> std: such samples take GroupNorm's statistics
        # (reading this CPU flag costs no device synchronisation)
        if not bool((mean.square() > 100 * var).any()):
            inv_std = torch.rsqrt(var.clamp_min(0) + eps)
            return mean.to(tokens.dtype), inv_std.to(tokens.dtype)
    flat = tokens.reshape(n, 1, -1)
    _, mean, inv_std = torch.native_group_norm(flat, None, None, n, 1, flat.shape[-1], 1, eps)
    return mean.view(n).to(tokens.dtype), inv_std.view(n).to(tokens.dtype)


def _pool_minus_input(tokens: Tensor, pool_size: int) -> Tensor:
    # avg_pool2d on the channels-last view of (N, H, W, C) tokens; permuting back is free.
    pooled = F.avg_pool2d(tokens.permute(0, 3, 1, 2), pool_size, stride=1,
                          padding=pool_size // 2, count_include_pad=False)
    return pooled.permute(0, 2, 3, 1) - tokens


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has one flag per device kind
        return (torch.is_autocast_cpu_enabled() if device_type == 'cpu'
                else torch.is_autocast_enabled())


def _block_forward(block: MetaFormerBlock, tokens: Tensor) -> Tensor:
    norm1, norm2, mlp = block.norm1, block.norm2, block.mlp
    # pool(a*x + b) - (a*x + b) = a * (pool(x) - x): norm1's weight joins the layer scale and
    # its bias cancels. The bias stays in the graph with a zero factor, because DDP expects a
    # gradient for every parameter (the plain formulation's is 0 up to rounding).
    mixer_scale = norm1.weight * block.layer_scale_1.scale + 0 * norm1.bias
    mixed = _pool_minus_input(_normalize(tokens, norm1.eps), block.token_mixer.pool_size)
    # norm2's affine map folds into fc1: a (4C x C) product per step instead of passes over
    # the activations, forward and backward
    fc1_weight = mlp.fc1.weight.flatten(1)
    fc1 = fc1_weight * norm2.weight, mlp.fc1.bias + fc1_weight @ norm2.bias
    fc2 = mlp.fc2.weight.flatten(1), mlp.fc2.bias
    scale2 = block.layer_scale_2.scale
    if isinstance(block.drop_path, nn.Identity):
        tokens = torch.addcmul(tokens, mixed, mixer_scale)
        hidden = mlp.act(F.linear(_normalize(tokens, norm2.eps), *fc1))
        if _autocast_enabled(tokens.device.type):
            # keep the residual stream in full precision, and the layer scale (1e-5 or
            # 1e-6) out of half-precision weights, where it would underflow
            return torch.addcmul(tokens, F.linear(hidden, *fc2), scale2)
        # layer_scale_2 folds into fc2, and the residual add into the matrix product
        flat = tokens.view(-1, tokens.shape[-1])
        out = torch.addmm(flat, hidden.view(flat.shape[0], -1), (fc2[0] * scale2[:, None]).t())
        return out.add_(fc2[1] * scale2).view(tokens.shape)
    tokens = tokens + block.drop_path(mixed * mixer_scale)
    hidden = mlp.act(F.linear(_normalize(tokens, norm2.eps), *fc1))
    return tokens + block.drop_path(F.linear(hidden, *fc2) * scale2)


@functools.lru_cache(maxsize=None)
def fused_linear_available() -> bool:
    """Whether this torch has oneDNN's fused linear + GELU / + add kernels and they agree with
    the unfused ops. They are private (``torch.ops.mkldnn._linear_pointwise``), so a torch
    without them, or one where they misbehave, gets the unfused path (with a warning) instead
    of an error."""
    try:
        # checked in fp32 whatever the caller's autocast or grad mode, since the answer is kept
        with torch.no_grad(), torch.autocast('cpu', enabled=False):
            linear = torch.ops.mkldnn._linear_pointwise
            generator = torch.Generator().manual_seed(0)
            x, residual = torch.randn(2, 5, 8, generator=generator).unbind(0)
            w1, b1 = torch.randn(16, 8, generator=generator), torch.randn(16, generator=generator)
            w2, b2 = torch.randn(8, 16, generator=generator), torch.randn(8, generator=generator)
            hidden = linear(x, w1, b1, 'gelu', [], 'none')
            out = linear.binary(hidden, residual, w2, b2, 'add')
            expected_hidden = F.gelu(F.linear(x, w1, b1))
            expected = residual + F.linear(expected_hidden, w2, b2)
            agree = (torch.allclose(hidden, expected_hidden, rtol=1e-5, atol=1e-5)
                     and torch.allclose(out, expected, rtol=1e-5, atol=1e-5))
        reason = 'they disagree with the unfused ops'
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        agree, reason = False, f'they are missing ({error})'
    if not agree:
        warnings.warn(f"oneDNN's fused linear kernels are not used: {reason}. Deployed "
                      'PoolFormer blocks run unfused: same outputs, slower on a CPU.')
    return agree


def _uses_fused_linear(tokens: Tensor, act: nn.Module) -> bool:
    # the fused kernels are fp32 here, have no autograd formula and only know exact GELU
    return (tokens.device.type == 'cpu' and tokens.dtype == torch.float32
            and not _autocast_enabled('cpu')
            and not (torch.is_grad_enabled() and tokens.requires_grad)
            and type(act) is nn.GELU and act.approximate == 'none'
            and torch.backends.mkldnn.is_available() and fused_linear_available())


class DeployPoolFormerBlock(nn.Module):
    """A PoolFormer block with norm affines and layer scales folded into the weights.

    ``x + s1 * (pool(x̂) - x̂)`` then ``x + fc2'(act(fc1'(x̂)))``, where ``x̂`` is the
    unscaled GroupNorm(1) output, ``s1 = layer_scale_1 * norm1.weight``,
    ``fc1' = fc1 · diag(norm2.weight)`` with bias ``fc1.bias + fc1 · norm2.bias`` and
    ``fc2' = diag(layer_scale_2) · fc2``. Works on (N, H, W, C) tokens; inference only.

    Pooling keeps constants, so ``pool(x̂) - x̂ = (pool(x) - x) / std(x)``: the mixer needs
    only the statistics of ``x``, never the normalised tensor.
    """

    def __init__(self, block: MetaFormerBlock):
        super().__init__()
        norm1, norm2, mlp = block.norm1, block.norm2, block.mlp
        with torch.no_grad():
            self.register_buffer('mixer_scale', block.layer_scale_1.scale * norm1.weight)
            fc1 = mlp.fc1.weight.flatten(1)
            self.register_buffer('fc1_weight', fc1 * norm2.weight)
            self.register_buffer('fc1_bias', mlp.fc1.bias + fc1 @ norm2.bias)
            scale2 = block.layer_scale_2.scale
            self.register_buffer('fc2_weight', mlp.fc2.weight.flatten(1) * scale2[:, None])
            self.register_buffer('fc2_bias', mlp.fc2.bias * scale2)
        self.eps1, self.eps2 = norm1.eps, norm2.eps
        self.pool_size = block.token_mixer.pool_size
        self.act = mlp.act

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        n, channels = tokens.shape[0], tokens.shape[-1]
        _, inv_std = _moments(tokens, self.eps1)
        mixer_scale = (inv_std[:, None] * self.mixer_scale).view(n, 1, 1, channels)
        tokens = torch.addcmul(tokens, _pool_minus_input(tokens, self.pool_size), mixer_scale)
        mean, inv_std = _moments(tokens, self.eps2)
        per_sample = (n, 1, 1, 1)  # (x - mean) * inv_std in one pass
        normed = torch.addcmul((-mean * inv_std).view(per_sample), tokens,
                               inv_std.view(per_sample))
        if _uses_fused_linear(tokens, self.act):
            linear = torch.ops.mkldnn._linear_pointwise
            hidden = linear(normed, self.fc1_weight, self.fc1_bias, 'gelu', [], 'none')
            return linear.binary(hidden, tokens, self.fc2_weight, self.fc2_bias, 'add')
        hidden = self.act(F.linear(normed, self.fc1_weight, self.fc1_bias))
        # autograd forbids the in-place form, and autocast does not cast for in-place ops
        if (torch.is_grad_enabled() and tokens.requires_grad) or hidden.dtype != tokens.dtype:
            return tokens + F.linear(hidden, self.fc2_weight, self.fc2_bias)
        # tokens is this block's own fresh tensor: accumulate the MLP into it in place
        flat = tokens.view(-1, tokens.shape[-1])
        flat.add_(self.fc2_bias).addmm_(hidden.view(flat.shape[0], -1), self.fc2_weight.t())
        return tokens

    def forward(self, x: Tensor) -> Tensor:
        """NCHW in, NCHW out, for use outside a fast stage."""
        return self.forward_tokens(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)


def stage_forward(stage: nn.Module, x: Tensor, with_cp: bool = False) -> Tensor:
    """Run a stage (optional downsample + blocks that :func:`can_run_fast`) in token layout.

    Returns the stage output as a channels-last NCHW tensor.
    """
    if stage.downsample is not None:
        x = stage.downsample(x)
    if getattr(stage, 'pos_embed', None) is not None:
        x = stage.pos_embed(x)
    tokens = x.permute(0, 2, 3, 1)
    if not tokens.is_contiguous():
        tokens = tokens.contiguous()
    for block in stage.blocks:
        run = block.forward_tokens if isinstance(block, DeployPoolFormerBlock) else (
            lambda t, block=block: _block_forward(block, t))
        if with_cp and tokens.requires_grad:
            tokens = cp.checkpoint(run, tokens, use_reentrant=False)
        else:
            tokens = run(tokens)
    return tokens.permute(0, 3, 1, 2)


def output_norm_forward(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """GroupNorm(1) with affine on a channels-last NCHW tensor; returns contiguous NCHW."""
    n, channels, height, width = x.shape
    if (x.device.type == 'cpu' and channels <= 128
            and x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and x.requires_grad)):
        # Necks and heads expect contiguous NCHW, and a CPU converts channels-last slowly
        # (about 2.5 GB/s). For few channels a batched product with diag(weight / std) does the
        # conversion and the normalisation in one pass: 4x faster for 64 channels at 128x128.
        mean, inv_std = _moments(x.permute(0, 2, 3, 1), norm.eps)
        scale = norm.weight * inv_std[:, None]  # (N, C)
        shift = norm.bias - scale * mean[:, None]
        tokens = x.permute(0, 2, 3, 1).reshape(n, height * width, channels)
        out = torch.baddbmm(shift[:, :, None], torch.diag_embed(scale), tokens.transpose(1, 2))
        return out.view(n, channels, height, width)
    # otherwise convert first, so that one group_norm kernel normalises and applies the affine
    return F.group_norm(x.contiguous(), 1, norm.weight, norm.bias, norm.eps)


def fast_forward(backbone: nn.Module, x: Tensor) -> tuple:
    """A PoolFormer forward with every stage of PoolFormer blocks in token layout.

    Same outputs as the plain forward. Stages with other token mixers (hybrids) run as usual.
    """
    # the stem's output comes out channels-last, so the first permute to tokens is free
    x = backbone.stem(x.contiguous(memory_format=torch.channels_last))
    outs = []
    for i, stage in enumerate(backbone.stages):
        if all(can_run_fast(block) for block in stage.blocks):
            x = stage_forward(stage, x, with_cp=getattr(stage, 'with_cp', False))
        else:
            x = stage(x.contiguous())
        if i in backbone.out_indices:
            norm = backbone.output_norms[str(i)]
            outs.append(output_norm_forward(norm, x) if _is_group_norm_1(norm) else
                        norm(x.contiguous()))
    return tuple(outs)


def _is_group_norm_1(norm: Optional[nn.Module]) -> bool:
    return isinstance(norm, nn.GroupNorm) and norm.num_groups == 1 and norm.affine


def switch_to_deploy(backbone: nn.Module) -> nn.Module:
    """Replace every foldable block of ``backbone`` by its :class:`DeployPoolFormerBlock`.

    Also stores the stem's and the downsampling convolutions' weights channels-last, the layout
    of their inputs on the fast path; otherwise every call reorders them.
    """
    for stage in backbone.stages:
        for j, block in enumerate(stage.blocks):
            if isinstance(block, MetaFormerBlock) and can_run_fast(block):
                stage.blocks[j] = DeployPoolFormerBlock(block)
    embeddings = [backbone.stem] + [stage.downsample for stage in backbone.stages]
    for conv in (m for e in embeddings if e is not None for m in e.modules()):
        if isinstance(conv, nn.Conv2d):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    return backbone
