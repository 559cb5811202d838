# Semantic FPN-S12 trained with less memory: the same model, loss and gradients as
# fpn_poolformer_s12.py. The backbone recomputes each block's activations in the backward pass
# (with_cp); the head (LowMemoryFPNHead, as in the base) keeps no full-resolution logits.
# Measured at 512x512, batch 2: see docs/speed.md.
_base_ = './fpn_poolformer_s12.py'

model = dict(backbone=dict(with_cp=True))
