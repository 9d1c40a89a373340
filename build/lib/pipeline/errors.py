"""Errors the user can fix: reported as one message, without a traceback."""


class UserError(Exception):
    """Bad input (params, data, archives, paths): the message names it and says what is expected."""

    exit_code = 1


class ParamsError(UserError):
    """`params.yaml` is unreadable or does not match the schema."""

    exit_code = 2
