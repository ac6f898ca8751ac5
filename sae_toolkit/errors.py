"""The toolkit's one error class: a message for people (what was wrong, the bad value, what to do)."""


class SAEToolkitError(Exception):
    """Raised for bad input or state the user can fix. The CLI prints it as one line, without a traceback."""
