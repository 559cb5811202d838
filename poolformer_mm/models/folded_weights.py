"""A model folded for inference refuses the weights of its unfolded form.

Folding (:meth:`PoolFormer.switch_to_deploy`,
:func:`~poolformer_mm.engine.prepare_for_inference`) replaces parameters by buffers under other
names (``fc1_weight``, ``mixer_scale`` ...). mmengine's ``load_checkpoint`` (``strict=False``)
would only log the trained model's keys and keep the folded weights, silently wrong, so the
folded module (the whole model, the backbone) refuses keys that folding removed, and says what
to do. Loads into a part of it, and keys folding kept but changed, are not checked.
"""
from typing import Iterable

from torch import nn

from ..utils.errors import InvalidInputError


class FoldedWeightsError(InvalidInputError):
    """Weights of a model's unfolded form loaded into its folded (inference) form."""


class RefuseUnfoldedWeights:
    """``load_state_dict`` pre-hook of a folded module: refuses a state dict holding any of
    ``unfolded_keys`` (relative to the module; ``what`` names the module in the message). A class
    rather than a closure, so the module still pickles."""

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
