"""Errors caused by the user's files or settings, and how the tools report them.

Their messages already say what was wrong and what to do, so the command-line tools print the
message alone instead of a traceback through mmengine's runner.
"""
import functools
import sys


class UserInputError(Exception):
    """A problem with a file, URL or setting the user gave; the message says how to fix it."""


class CheckpointUnavailableError(UserInputError, FileNotFoundError):
    """A checkpoint (file or URL) that cannot be read here, e.g. a URL without network access
    and without a local copy."""


def report_user_errors(main):
    """Decorate a tool's ``main``: a :class:`UserInputError` ends the process with its message
    on stderr and exit code 1, without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserInputError as err:
            message = str(err)
            # torch re-raises a data loader worker's error as its type, with a text that holds
            # the worker's traceback and ends in '<module>.<class>: <the message>'
            if '\nOriginal Traceback' in message:
                message = message.rstrip().splitlines()[-1].partition(': ')[2]
            sys.exit(f'error: {message}')

    return wrapper


class InvalidInputError(UserInputError, ValueError):
    """A file or setting with content the tools cannot use (a damaged image, a wrong label,
    a checkpoint of another model, an unknown metric)."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A data set, image or other input file that is not where the config or flag says."""


class WorkDirInUseError(UserInputError, RuntimeError):
    """A second training started in a work dir that another one is using."""


class UnknownSettingError(UserInputError, TypeError):
    """A setting that a config passes to a class that does not take it (a typo such as
    ``out_indice``); a ``TypeError``, as Python's own for an unexpected keyword argument."""
