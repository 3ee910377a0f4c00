"""The one exception the data pipeline raises for bad input; its message names the file and the fix."""


class DataError(ValueError):
    """Unusable data (missing, corrupt, mismatched, undecodable): the message names the file and the fix."""
