"""Errors for a data set that cannot be read, each told in one line that a user can act on.

They share a base class of their own (not ``OSError``/``ValueError``) so that a reader's own
``except`` clauses around file and unpickling errors can never swallow and re-word them.
"""


class DatasetError(Exception):
    """A data set that cannot be loaded; the message names the file and what to do."""


class DatasetNotFoundError(DatasetError):
    """The data set's files are not under the data root; the message says where to get them."""


class DatasetCorruptError(DatasetError):
    """A data file is there but truncated or not in the official format; the message names it."""


def one_line(error: BaseException) -> str:
    """``error`` as ``Type: message`` on one line, for the parenthesis of a DatasetError message."""
    return " ".join(f"{type(error).__name__}: {error}".split())
