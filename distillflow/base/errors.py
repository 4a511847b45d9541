"""The refusals a user fixes in their own inputs, as one family of exceptions.

A stage's main() that raises one of these ends with `error: <message>` and exit status 2
(distillflow/stagekit/entry.py), not a traceback: the message names what to change (the
params key, the model folder and property, or the file, row and field). Anything else
that escapes a stage is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A refusal of the user's input; the message says what to change."""


class ParamsError(UsageError):
    """A params file or key is missing, malformed or out of range; the message names the key."""


class ModelError(UsageError):
    """A model (folder, tokenizer, config) cannot be used as configured; the message names
    the model and the property."""
