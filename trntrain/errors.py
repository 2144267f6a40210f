"""Errors whose message is meant for the user as is: the CLI prints it, without a traceback."""


class UserError(Exception):
    """Bad input (config, data file, checkpoint, command line), explained in one paragraph."""
