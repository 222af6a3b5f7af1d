"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""


class PrismError(ValueError):
    """Input the library cannot serve: a bad plan, checkpoint, batch or argument."""
