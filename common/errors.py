"""Mistakes a user can fix, found once a command runs (config mistakes are :class:`ConfigError`)."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix, found at run time: a folder that cannot be written, a missing data
    file, a model folder that is not there. The message names the problem and the fix in one line;
    commands print it as their last line and exit 1, and the traceback goes to the log file only.
    A ``ValueError`` so that callers catching those still do."""
