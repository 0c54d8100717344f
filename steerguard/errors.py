"""The one error type users see: a single line saying what is wrong and what to do."""


class SteerguardError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""


def where(path: object, line: int | None = None) -> str:
    """`file:line` for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
