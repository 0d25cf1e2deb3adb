"""The one exception type for bad user input (files, JSON entries, options), the CLI wrapper, secret redaction."""
import re


class InputError(ValueError):
    """Bad input detected before work starts. The message is one line naming the file/field."""


def fail(message: str) -> "InputError":
    """Return an InputError with a single-line message (newlines collapsed)."""
    return InputError(" ".join(str(message).split()))


def run_cli(main, parse_args, argv=None, errors=()) -> int:
    """Run a script's `main(parse_args(argv))`; bad input (and `errors`) print one 'error: ...' line, exit code 2.

    Ctrl-C prints one line instead of a traceback and exits 130 (128 + SIGINT, as shells report it); every
    stage writes its outputs atomically and resumes, so rerunning the same command continues the work.
    """
    import sys

    try:
        main(parse_args(argv))
    except (InputError, *errors) as e:
        print(f"error: {redact_secrets(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]+(?::[^/\s@]*)?@")
_KEY_PATTERNS = (
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),  # OpenAI-style secret keys
    re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|token|password|secret)=)[^&\s]+"),  # query parameters
)
SECRET_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def redact_secrets(text):
    """`text` with URL credentials (scheme://user:password@host), API keys and token query parameters masked.

    Apply to anything written (manifests, run configs) or printed that may hold a user-given URL or key.
    Non-strings are returned unchanged.
    """
    import os

    if not isinstance(text, str):
        return text
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    text = _KEY_PATTERNS[0].sub("***", text)
    text = _KEY_PATTERNS[1].sub(r"\1***", text)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text
