"""Errors a user can fix. The CLI prints them as one line (``error: ...``) and exits with status 2."""


class UserError(Exception):
    """Bad input (file, option, protocol field): the message names the file and the fix."""
