"""The one exception type the CLI turns into a clear message (and exit code 2) instead of a traceback."""


class LauncherError(Exception):
    """A problem the user can fix: the message says what and where (file, line, field) and what to change."""
