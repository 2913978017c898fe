"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do.

    launch.py prints it as one line and exits non-zero; programming errors keep
    their traceback.
    """
