"""Cross-entropy of low-resolution logits against full-resolution labels, computed a band of
rows at a time, fast and without keeping the full-resolution logits.

A segmentation head predicts at 1/4 of the image size, and mmseg upsamples the logits to the
label size before the loss. For ADE20K at 512x512 and batch 2 that is 150 x 512 x 512 x 2 floats,
315 MB, and autograd keeps several tensors of that size (the upsampled logits, the log-softmax
it saves, their gradients). Each of the passes over them (resize, cast, log-softmax, gather,
top-k, and the same backwards) streams that tensor through memory: on a CPU they took about
half of a bf16 Semantic FPN-S12 training step.

Here bilinear resizing is split in two, as it is separable: the logits are first resized along
the width (a small tensor, ``C x h x W``), then bands of output rows are formed one at a time as
a small matrix product with the rows of the height-resizing matrix. Everything a band needs (its
log-sum-exp, the target logit, the arg-max) is computed while it is in cache. The forward pass
keeps one scalar per pixel, the log-sum-exp; the backward pass forms each band again, turns it
into its gradient in place (``softmax - one_hot``, masked and scaled) and sends it back through
the transposed height matrix (another small matrix product) and the width resizing's backward.

The loss is the one mmseg's ``CrossEntropyLoss`` computes on ``F.interpolate``'d logits
(softmax, mean reduction, ``ignore_index``, ``avg_non_ignore``, ``loss_weight``), summed in a
different order. The statistics and the height products are computed in fp32 (fp64 for fp64
logits) whatever the autocast state; the width resize runs in the logits' dtype where its
weights are exact in it (bf16 under autocast for integer scale factors), else in fp32.
"""
from typing import List, Tuple

import torch
from torch import Tensor

# Elements per band. On a CPU, 8 rows of 150 classes x 512 pixels in fp32 are 2.4 MB, about one
# core's L2 cache on current server CPUs, so the passes over a band do not go to memory. A GPU
# streams from memory fast but pays for every kernel launch: there bands are as large as the
# memory saving allows (128 MB in fp32, two bands for a 512x512 image with 150 classes).
BAND_ELEMENTS = {'cpu': 8 * 150 * 512}
GPU_BAND_ELEMENTS = 2**25


def resize_matrix(out_size: int, in_size: int, align_corners: bool) -> Tensor:
    """The (out_size, in_size) fp64 matrix of 1-D linear resizing exactly as ``F.interpolate(...,
    mode='bilinear', size=...)`` computes it along one axis (source index, clamping, and the
    edge where both neighbours are the last pixel)."""
    dst = torch.arange(out_size, dtype=torch.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = ((in_size / out_size) * (dst + 0.5) - 0.5).clamp_min(0)
    low = src.long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    high_weight = (src - low).clamp(0, 1)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1 - high_weight, accumulate=True)
    matrix.index_put_((rows, high), high_weight, accumulate=True)
    return matrix


def _bands(matrix: Tensor, rows_per_band: int) -> List[Tuple[slice, slice, Tensor]]:
    """(output rows, input rows, the matrix's block) for each band of output rows."""
    bands = []
    for start in range(0, matrix.shape[0], rows_per_band):
        block = matrix[start:start + rows_per_band]
        used = block.abs().sum(0).nonzero().flatten()
        first, last = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
        bands.append((slice(start, start + rows_per_band), slice(first, last),
                      block[:, first:last].contiguous()))
    return bands


class _UpsampledCrossEntropy(torch.autograd.Function):

    @staticmethod
    def _setup(logits: Tensor, labels: Tensor, align_corners: bool, compute: torch.dtype):
        """The width-resizing matrix and the bands of output rows with their blocks of the
        height-resizing matrix (in ``compute`` precision).

        The width product runs in the logits' dtype when the matrix is exact in it: bf16 under
        autocast for integer scale factors (weights such as 1/8, 3/8), so it runs on bf16 units
        and its output is rounded to bf16 as mmseg's resize under autocast rounds it. Other
        factors' weights would be rounded too, and rows that do not sum to one bias every
        logit, so those run in ``compute`` precision."""
        (height, width), (low_height, low_width) = labels.shape[-2:], logits.shape[-2:]
        width_matrix_t = resize_matrix(width, low_width, align_corners).T.contiguous()
        exact = torch.equal(width_matrix_t.to(logits.dtype).double(), width_matrix_t)
        width_matrix_t = width_matrix_t.to(logits.dtype if exact else compute)
        height_matrix = resize_matrix(height, low_height, align_corners)
        band_elements = BAND_ELEMENTS.get(logits.device.type, GPU_BAND_ELEMENTS)
        rows_per_band = max(1, band_elements // (logits.shape[1] * width))
        bands = [(out_rows, in_rows, block.to(compute).to(logits.device))
                 for out_rows, in_rows, block in _bands(height_matrix, rows_per_band)]
        return width_matrix_t.to(logits.device), bands

    @staticmethod
    def _width_resized(image_logits: Tensor, width_matrix_t: Tensor) -> Tensor:
        """(h, C * W): one image's (C, h, w) logits resized along the width, rows outermost so
        that a band of input rows is one contiguous block."""
        rows = image_logits.transpose(0, 1).reshape(-1, image_logits.shape[-1])
        return (rows.to(width_matrix_t.dtype) @ width_matrix_t).view(image_logits.shape[1], -1)

    @staticmethod
    def _labelled_bands(rows: Tensor, image_labels: Tensor, bands: list, num_classes: int,
                        ignore_index: int):
        """For each band of one image: its rows and block, the (r, C, W) resized logits in the
        blocks' precision (a product with two or three rows is memory-bound: fp32 operands run
        it faster than bf16 ones), whether each pixel is labelled, and its target class
        (0 where unlabelled), (r, 1, W)."""
        for out_rows, in_rows, block in bands:
            band = (block @ rows[in_rows].to(block.dtype)).view(len(block), num_classes, -1)
            band_labels = image_labels[out_rows]
            valid = band_labels != ignore_index
            yield out_rows, in_rows, block, band, valid, band_labels.where(valid, 0).unsqueeze(1)

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, align_corners: bool,
                normalizer: float) -> Tuple[Tensor, Tensor]:
        compute = torch.promote_types(logits.dtype, torch.float32)
        num_classes = logits.shape[1]
        with torch.autocast(logits.device.type, enabled=False):
            width_matrix_t, bands = _UpsampledCrossEntropy._setup(logits, labels, align_corners,
                                                                  compute)
            ctx.resizing = width_matrix_t, bands  # for the backward pass
            total = logits.new_zeros((), dtype=torch.float64)
            correct = labels.new_zeros(())
            log_sum_exp = logits.new_empty(labels.shape, dtype=compute)
            for index, image_logits in enumerate(logits):
                rows = _UpsampledCrossEntropy._width_resized(image_logits, width_matrix_t)
                for out_rows, _, _, band, valid, targets in _UpsampledCrossEntropy._labelled_bands(
                        rows, labels[index], bands, num_classes, ignore_index):
                    target_logit = band.gather(1, targets)
                    top = band.amax(1, keepdim=True)
                    # a pixel is right when its label's logit is the largest (arg-max without
                    # indices, which the max-with-indices kernel makes 10x slower)
                    correct += ((target_logit >= top).squeeze(1) & valid).sum()
                    band_lse = band.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))
                    log_sum_exp[index, out_rows] = band_lse
                    nll = (band_lse - target_logit.squeeze(1))[valid]
                    total += nll.sum(dtype=torch.float64)
        ctx.save_for_backward(logits, labels, log_sum_exp)
        ctx.options = (ignore_index, normalizer)
        # reported in fp32 at least, as mmseg's loss is under autocast
        valid_count = (labels != ignore_index).sum().clamp_min(1)
        accuracy = (100.0 * correct / valid_count).to(compute)
        ctx.mark_non_differentiable(accuracy)
        return (total / normalizer).to(compute), accuracy

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_accuracy: Tensor):
        if torch.is_grad_enabled():  # only under create_graph=True
            raise RuntimeError(
                'upsampled_cross_entropy (the loss of the LowMemory* segmentation heads) has no '
                'second derivative: for a gradient penalty or other double backward, use '
                "mmseg's head (type='FPNHead', 'UPerHead' or 'FCNHead').")
        logits, labels, log_sum_exp = ctx.saved_tensors
        ignore_index, normalizer = ctx.options
        compute = log_sum_exp.dtype
        num_classes, low_height, low_width = logits.shape[1:]
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        width_matrix_t, bands = ctx.resizing
        with torch.autocast(logits.device.type, enabled=False):
            scale = (grad_loss / normalizer).to(compute)
            grad_rows = None
            for index, image_logits in enumerate(logits):
                rows = _UpsampledCrossEntropy._width_resized(image_logits, width_matrix_t)
                # one buffer for every image: fresh memory of this size costs page faults
                grad_rows = (torch.zeros(rows.shape, dtype=compute, device=rows.device)
                             if grad_rows is None else grad_rows.zero_())
                for out_rows, in_rows, block, band, valid, targets in (
                        _UpsampledCrossEntropy._labelled_bands(rows, labels[index], bands,
                                                               num_classes, ignore_index)):
                    # d nll / d logits = softmax - one_hot, masked and scaled, in place
                    band.sub_(log_sum_exp[index, out_rows].unsqueeze(1)).exp_()
                    band.scatter_add_(1, targets, band.new_full(targets.shape, -1.0))
                    band.mul_((valid * scale).unsqueeze(1))
                    grad_rows[in_rows].addmm_(block.T, band.flatten(1))
                # back through the width resizing, in the width matrix's precision
                grad_low = (grad_rows.to(width_matrix_t.dtype)
                            .view(-1, width_matrix_t.shape[1]) @ width_matrix_t.T)
                grad_logits[index] = grad_low.view(low_height, num_classes,
                                                   low_width).transpose(0, 1)
        return grad_logits, None, None, None, None


def upsampled_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255,
                            align_corners: bool = False, avg_non_ignore: bool = False,
                            loss_weight: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Softmax cross-entropy of ``logits`` bilinearly resized to the size of ``labels``.

    Args:
        logits (Tensor): (N, K, h, w) class scores at any resolution.
        labels (Tensor): (N, H, W) class indices; ``ignore_index`` marks pixels without a label.
        ignore_index (int): Label of pixels that add neither loss nor gradient. Default: 255.
        align_corners (bool): As in ``F.interpolate``. Default: False.
        avg_non_ignore (bool): Average over labelled pixels only, as mmseg's option of that
            name; otherwise over all N * H * W pixels (mmseg's default). Default: False.
        loss_weight (float): Multiplies the loss. Default: 1.0.

    Returns:
        tuple[Tensor, Tensor]: The loss (differentiable once with respect to ``logits``) and
        the top-1 pixel accuracy in percent over labelled pixels (0 when there are none). A
        pixel whose label's logit ties the largest one counts as right; mmseg's ``accuracy``
        breaks such ties by class order.

    The logits must be finite: the resize is a product with a dense matrix, so one ``-inf``
    logit makes its row NaN (mmseg's resize reads only the two neighbours).
    """
    if (labels.dim() != 3 or logits.dim() != 4 or labels.shape[0] != logits.shape[0]
            or 0 in labels.shape[1:] or 0 in logits.shape[1:]):
        raise ValueError(f'expected (N, K, h, w) logits and (N, H, W) labels of non-zero sizes, '
                         f'got {tuple(logits.shape)} and {tuple(labels.shape)}')
    count = int((labels != ignore_index).sum()) if avg_non_ignore else labels.numel()
    # mmseg divides by (count + eps) so that a batch without labels gives 0, not NaN
    normalizer = count + torch.finfo(torch.float32).eps
    loss, accuracy = _UpsampledCrossEntropy.apply(logits, labels, ignore_index, align_corners,
                                                  normalizer)
    return loss_weight * loss, accuracy
