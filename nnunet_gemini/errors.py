"""User-facing errors and warnings: every message names the file or flag and the fix."""
import sys


class GeminiUserError(Exception):
    """A problem the user can fix (bad input, missing setup). CLIs print it and exit 2."""


def warn_user(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def run_cli(main_fn, argv=None) -> int:
    """Run a CLI body; turn GeminiUserError into `ERROR: ...` on stderr and exit status 2."""
    try:
        rc = main_fn(argv)
    except GeminiUserError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 2
    return 0 if rc is None else int(rc)
