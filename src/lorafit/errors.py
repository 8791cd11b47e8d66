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


def first_line(err: BaseException) -> str:
    """The error's first non-blank line, or its type's name when its message is empty."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
