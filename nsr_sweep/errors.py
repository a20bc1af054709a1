"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class NsrError(ValueError):
    """Bad input or an impossible request, raised before expensive work where possible.

    The message names the field (or thing), the bad value and what is allowed.
    """
