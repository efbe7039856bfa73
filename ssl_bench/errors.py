"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A problem with what the user gave us (data, options, folders), not a bug."""


class Interrupted(Exception):
    """Training stopped early at an iteration boundary with a checkpoint written; --resume continues it."""
