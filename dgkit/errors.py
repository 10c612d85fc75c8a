"""User errors as messages: what the command-line entry points print instead of a traceback.

A wrong config value, a missing dataset, a corrupt checkpoint or a folder in use is the user's to fix, and the
message that says how is the whole answer: ``train.py``, ``scripts/evaluate.py`` and ``scripts/predict.py``
print it as one paragraph and exit with status 2. The traceback is kept for ``HYDRA_FULL_ERROR=1`` (Hydra's
own switch) or ``DGKIT_DEBUG=1``. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue


class UserError(Exception):
    """Bad input or a state the user must resolve (e.g. a run folder in use), not a bug."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, MissingMandatoryValue)
"""Exception types that, raised from dgkit's checks, describe bad input."""
CONFIG_ERRORS = (TypeError,)
"""Also user errors when raised while instantiating a config (an unknown or mistyped argument)."""
EXIT_USER_ERROR = 2


def root_cause(err: BaseException) -> BaseException:
    """The error inside Hydra's instantiation wrappers (they nest one per config level)."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def show_tracebacks() -> bool:
    """Whether the user asked for full tracebacks (``HYDRA_FULL_ERROR=1`` or ``DGKIT_DEBUG=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DGKIT_DEBUG") == "1"


def report(err: BaseException) -> NoReturn:
    """Print ``error: <message>`` (and how to see the traceback) to stderr and exit with status 2."""
    message = str(err).strip() or type(err).__name__
    print(f"error: {message}\n(set HYDRA_FULL_ERROR=1 to see the traceback)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_reporting_user_errors(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``function``; a user error (:data:`USER_ERRORS`, unwrapped from Hydra) becomes :func:`report`."""
    try:
        return function(*args, **kwargs)
    except (InstantiationException, *USER_ERRORS) as err:
        cause = root_cause(err)
        from_config = isinstance(err, InstantiationException) and isinstance(cause, CONFIG_ERRORS)
        if show_tracebacks() or not (isinstance(cause, USER_ERRORS) or from_config):
            raise
        report(cause)
