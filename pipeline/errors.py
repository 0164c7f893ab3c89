"""The one exception type for mistakes a user can fix: the CLI prints it as a single line, without a traceback."""


class UserError(Exception):
    """A bad recipe key or value, a missing path, a malformed record, a finished run in the way.

    The message names what is wrong and how to fix it, on one line.
    """
