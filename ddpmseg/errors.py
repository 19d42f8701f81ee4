"""User-facing errors.

Library code raises :class:`DdpmsegError` for anything a user can fix (a bad
file, a wrong option). Its message is one line that says what was wrong and
how to fix it; the CLI prints it without a traceback and exits non-zero.
"""


class DdpmsegError(Exception):
    """A problem with the user's input, described in one actionable line."""
