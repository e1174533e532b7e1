"""Bad input from the user: raised anywhere, shown as one line by the command-line entry points."""

import contextlib
import errno
import sys

# what the machine refuses, wherever a file is written: one line, not a traceback
MACHINE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


class UserError(ValueError):
    """A problem with what the user asked for (a missing file, a malformed record), not a bug."""


@contextlib.contextmanager
def user_errors():
    """Turn a UserError, a full disk or a refused permission into `error: ...` and exit status 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in MACHINE_ERRORS:
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
