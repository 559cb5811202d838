"""Cross-entropy of low-resolution logits against full-resolution labels, without keeping the
full-resolution logits.

A segmentation head predicts at 1/4 of the image size, and mmseg upsamples the logits to the
label size before the loss. For ADE20K at 512x512 and batch 2 that is 150 x 512 x 512 x 2 floats,
315 MB, and autograd keeps several tensors of that size (the upsampled logits, the log-softmax
it saves, their gradients): about half of a Semantic FPN-S12 training step's peak memory.

Here the forward pass upsamples one image at a time and keeps only per-pixel scalars; the
backward pass upsamples again, turns the logits into their gradient in place
(``softmax - one_hot``, masked and scaled) and sends it back through the upsampling. At most
one image's full-resolution logits exist at a time. The loss is the one mmseg's
``CrossEntropyLoss`` computes (softmax, mean reduction, ``ignore_index``, ``avg_non_ignore``,
``loss_weight``), summed in a different order.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _upsample(logits: Tensor, size: Tuple[int, int], align_corners: bool) -> Tensor:
    return F.interpolate(logits, size=size, mode='bilinear', align_corners=align_corners)


class _UpsampledCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, align_corners: bool,
                normalizer: float) -> Tuple[Tensor, Tensor]:
        size = tuple(labels.shape[-2:])
        total = logits.new_zeros((), dtype=torch.float64)
        correct = labels.new_zeros(())
        for image_logits, image_labels in zip(logits.split(1), labels.split(1)):
            full = _upsample(image_logits, size, align_corners)  # (1, K, H, W)
            valid = image_labels != ignore_index
            targets = image_labels.where(valid, 0).unsqueeze(1)
            nll = torch.logsumexp(full, dim=1) - full.gather(1, targets).squeeze(1)
            total += nll[valid].sum(dtype=torch.float64)
            correct += ((full.argmax(1) == image_labels) & valid).sum()
            del full
        ctx.save_for_backward(logits, labels)
        ctx.options = (ignore_index, align_corners, normalizer)
        # reported in fp32 at least, as mmseg's loss is under autocast
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        valid_count = (labels != ignore_index).sum().clamp_min(1)
        accuracy = (100.0 * correct / valid_count).to(out_dtype)
        ctx.mark_non_differentiable(accuracy)
        return (total / normalizer).to(out_dtype), accuracy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, grad_accuracy: Tensor):
        logits, labels = ctx.saved_tensors
        ignore_index, align_corners, normalizer = ctx.options
        size = tuple(labels.shape[-2:])
        grads = []
        for image_logits, image_labels in zip(logits.split(1), labels.split(1)):
            with torch.enable_grad():
                low = image_logits.detach().requires_grad_()
                full = _upsample(low, size, align_corners)
            valid = image_labels != ignore_index
            targets = image_labels.where(valid, 0).unsqueeze(1)
            # d nll / d logits = softmax - one_hot, written over the recomputed logits; the
            # upsampling saves no tensor for its backward, so overwriting them is safe
            grad_full = full.detach()
            torch.softmax(grad_full, dim=1, out=grad_full)
            grad_full.scatter_add_(1, targets, grad_full.new_full(targets.shape, -1.0))
            grad_full.mul_((valid * (grad_loss / normalizer)).unsqueeze(1).to(grad_full.dtype))
            grads.append(torch.autograd.grad(full, low, grad_full)[0])
            del full, grad_full
        return torch.cat(grads), None, None, None, None


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
        tuple[Tensor, Tensor]: The loss (differentiable with respect to ``logits``) and the
        top-1 pixel accuracy in percent over labelled pixels.
    """
    if labels.dim() != 3 or logits.dim() != 4 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f'expected (N, K, h, w) logits and (N, H, W) labels, got '
                         f'{tuple(logits.shape)} and {tuple(labels.shape)}')
    count = int((labels != ignore_index).sum()) if avg_non_ignore else labels.numel()
    # mmseg divides by (count + eps) so that a batch without labels gives 0, not NaN
    normalizer = count + torch.finfo(torch.float32).eps
    loss, accuracy = _UpsampledCrossEntropy.apply(logits, labels, ignore_index, align_corners,
                                                  normalizer)
    return loss_weight * loss, accuracy
