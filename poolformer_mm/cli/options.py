"""Command-line options shared by the tools: ``--amp`` and a checked ``--cfg-options``."""
import argparse

from mmengine.config import DictAction

from ..deploy.precision import AMP_CHOICES


def amp_argument(value: str) -> str:
    """The ``type`` of an ``--amp [auto|bf16|fp16]`` command-line option: a value that is not
    a choice, such as a config given after ``--amp``, is refused saying how to write it."""
    if value not in AMP_CHOICES:
        raise argparse.ArgumentTypeError(
            f"takes {', '.join(AMP_CHOICES)}, not '{value}'"
            + (' (a config? --amp takes an optional value, so write it after the config)'
               if value.endswith('.py') else ''))
    return value


def add_amp_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--amp [auto|bf16|fp16]`` on ``parser``, its help starting with ``what``."""
    parser.add_argument(
        '--amp', nargs='?', const='auto', type=amp_argument, metavar='{auto,bf16,fp16}',
        help=f'{what}. auto (the default of a bare --amp): fp16 on a GPU, bf16 autocast on a CPU '
        'with bf16 units, fp32 with a warning on a CPU without them, where bf16 is emulated and '
        'slower; bf16 or fp16 as named (fp16: GPUs only)')


class CheckedDictAction(DictAction):
    """mmengine's ``DictAction`` (``--cfg-options``), refusing with an argparse error that names
    the token what it fails on obscurely: a token without '=', and unbalanced brackets."""

    def __call__(self, parser, namespace, values, option_string=None):
        for token in values or []:
            key, sep, value = token.partition('=')
            if not sep or not key:
                what = "no '='" if not sep else 'no key before the ='
                raise argparse.ArgumentError(
                    self, f"expected KEY=VALUE pairs (e.g. train_cfg.max_epochs=1 "
                    f"model.backbone.init_cfg=None), got '{token}' ({what}). Write each pair as "
                    "one word: key=value, not key = value.")
            try:
                self._parse_iterable(value)
            except AssertionError as err:  # mmengine asserts balanced brackets
                raise argparse.ArgumentError(
                    self, f"bad value in '{token}': {err}. Expected KEY=VALUE, with a list "
                    "written as [a,b] or a tuple as (a,b).") from None
        super().__call__(parser, namespace, values, option_string)
