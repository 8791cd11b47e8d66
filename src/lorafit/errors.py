"""lorafit's one error type: every problem a user can fix is raised as LorafitError with a one-line message."""


class LorafitError(Exception):
    """A problem with the user's input (config, model, data, files), explained in one line.

    The CLI prints the message alone (no traceback unless --debug) and exits non-zero; library users
    can catch this one type for everything lorafit reports as their mistake rather than a bug.
    """


def brief(names: list[str], shown: int = 6) -> str:
    """A few names for a one-line message ("a, b, c, ... 4 more"), "nothing" when there are none."""
    if not names:
        return "nothing"
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
