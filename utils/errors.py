"""The one exception type for bad user input (files, JSON entries, options)."""


class InputError(ValueError):
    """Bad input detected before work starts. The message is one line naming the file/field."""


def fail(message: str) -> "InputError":
    """Return an InputError with a single-line message (newlines collapsed)."""
    return InputError(" ".join(str(message).split()))


def run_cli(main, parse_args, argv=None, errors=()) -> int:
    """Run a script's `main(parse_args(argv))`; bad input (and `errors`) print one 'error: ...' line, exit code 2."""
    import sys

    try:
        main(parse_args(argv))
    except (InputError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
