"""Bad input from the user: raised anywhere, shown as one line by the command-line entry points."""

import contextlib
import sys


class UserError(ValueError):
    """A problem with what the user asked for (a missing file, a malformed record), not a bug."""


@contextlib.contextmanager
def user_errors():
    """Turn a UserError into `error: ...` and exit status 2 instead of a traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
