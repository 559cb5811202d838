"""Errors caused by the user's files or settings, whose messages the command-line tools print
alone, without a traceback."""
import functools
import sys


class UserInputError(Exception):
    """A problem with a file, URL or setting the user gave; the message says how to fix it."""


class CheckpointUnavailableError(UserInputError, FileNotFoundError):
    """A checkpoint (file or URL) that cannot be read here, e.g. a URL without network access."""


def report_user_errors(main):
    """Decorate a tool's ``main``: a :class:`UserInputError` ends the process with its message
    on stderr and exit code 1, without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserInputError as err:
            message = str(err)
            # a data loader worker's error, re-raised by torch with the worker's traceback
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
    """A setting that a config passes to a class that does not take it (e.g. ``out_indice``)."""
