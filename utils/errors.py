"""The one exception type for bad user input (files, JSON entries, options)."""


class InputError(ValueError):
    """Bad input detected before work starts. The message is one line naming the file/field."""


def fail(message: str) -> "InputError":
    """Return an InputError with a single-line message (newlines collapsed)."""
    return InputError(" ".join(str(message).split()))
