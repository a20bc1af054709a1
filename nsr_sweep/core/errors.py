"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


def redacted(text: str | None) -> str | None:
    """A database or tracking URL without its password (state files and messages are shared)."""
    import re

    return re.sub(r"://([^:/@\s]+):[^@/\s]+@", r"://\1:***@", text) if text else text


class NsrError(ValueError):
    """Bad input or an impossible request, raised before expensive work where possible.

    The message names the field (or thing), the bad value and what is allowed.
    """
