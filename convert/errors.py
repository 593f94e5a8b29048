"""The one exception type the converter raises for bad input; the CLI prints it without a traceback."""


class ConvertError(ValueError):
    """Something about the sources, options or output folder is wrong; the message says what and how to fix it."""
