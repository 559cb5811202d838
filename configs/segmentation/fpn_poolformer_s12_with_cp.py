# Semantic FPN-S12 trained with less memory: the same model, loss and gradients as
# fpn_poolformer_s12.py. The backbone recomputes each block's activations in the backward pass
# (with_cp), and the head computes the loss without keeping the whole batch's full-resolution
# logits. Measured at 512x512, batch 2: see "Speed" in the README.
_base_ = './fpn_poolformer_s12.py'
custom_imports = dict(
    imports=['poolformer_mm', 'poolformer_mm.models.decode_heads'], allow_failed_imports=False)

model = dict(backbone=dict(with_cp=True), decode_head=dict(type='LowMemoryFPNHead'))
