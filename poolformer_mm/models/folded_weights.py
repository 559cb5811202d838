"""A model folded for inference refuses the weights of its unfolded form.

Folding (:meth:`PoolFormer.switch_to_deploy`,
:func:`~poolformer_mm.engine.prepare_for_inference`) replaces parameters by folded buffers
under other names: ``blocks.{j}.norm1.weight``, ``mlp.fc1.weight`` and the layer scales become
``fc1_weight``, ``mixer_scale`` ...; folded batch norms disappear. A checkpoint of the trained
(unfolded) model loaded afterwards would find none of its keys. mmengine's ``load_checkpoint``
(``strict=False``) only logs them, and the model keeps computing with the weights it was folded
from, silently wrong; torch's strict ``load_state_dict`` lists a few hundred keys. So the folded
module checks first and says what to do.

What is checked: loads into the module that was folded (the whole model, the backbone) with
keys that folding removed. Not checked: loads into a part of it (a stage, a head), and keys that
folding kept but changed (a convolution with a batch norm folded in): a folded model is for
running, and weights belong in the model before it is folded.
"""
from typing import Iterable

from torch import nn

from ..utils.errors import InvalidInputError


class FoldedWeightsError(InvalidInputError):
    """Weights of a model's unfolded form loaded into its folded (inference) form."""


class RefuseUnfoldedWeights:
    """``load_state_dict`` pre-hook of a folded module: refuses a state dict holding keys that
    only its unfolded form has. A class rather than a closure, so the module still pickles.

    Args:
        unfolded_keys (Iterable[str]): State-dict keys, relative to the module, that folding
            removed.
        what (str): The folded module in a user's words, for the message.
    """

    def __init__(self, unfolded_keys: Iterable[str], what: str):
        self.unfolded_keys = frozenset(unfolded_keys)
        self.what = what

    def __call__(self, state_dict: dict, prefix: str, *args) -> None:
        found = sorted(key for key in state_dict
                       if key.startswith(prefix) and key[len(prefix):] in self.unfolded_keys)
        if found:
            raise FoldedWeightsError(
                f'{self.what} was folded for inference, and the weights being loaded are of its '
                f"unfolded form ({len(found)} key(s) it no longer has, e.g. '{found[0]}'); "
                'loaded now they would change nothing. Load the checkpoint first and fold '
                'afterwards (tools/test.py --deploy does it in that order), or load it into a '
                'model built again from the config.')


def refuse_unfolded_weights(module: nn.Module, keys_before: Iterable[str], what: str) -> None:
    """After ``module`` was folded: make its ``load_state_dict`` (torch's, mmengine's) refuse
    state dicts with keys it had before folding (``keys_before``) and has no longer."""
    removed = set(keys_before) - set(module.state_dict())
    if removed:
        module._register_load_state_dict_pre_hook(RefuseUnfoldedWeights(removed, what))
