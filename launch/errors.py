"""Errors the command line reports as one line with exit status 2."""


class UserError(Exception):
    """Bad input the user can fix (command line, data, checkpoint); the message names the problem and the fix."""
