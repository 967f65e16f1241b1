"""The one exception type for mistakes a user can make and fix."""


class EmbedcacheError(Exception):
    """An expected mistake (bad input, missing file, mismatched cache).

    The message is one line that says what was wrong and what to do; the CLI
    prints it without a traceback and exits non-zero.
    """
