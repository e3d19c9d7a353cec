"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input or configuration.

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    The message must name the file/line/key at fault and what was expected.
    """
