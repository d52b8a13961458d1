"""The one exception type the command line turns into a one-line error and a non-zero exit."""


class UsageError(ValueError):
    """Bad input from the user: the message names the argument and the value, and says what to do."""
