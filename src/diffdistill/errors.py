"""The one exception type the package raises for bad input.

Scripts catch :class:`DiffdistillError`, print its message (which names the file or key and what
was expected) and exit non-zero; anything else is a bug and keeps its traceback.
"""


class DiffdistillError(Exception):
    """Bad input: a wrong path, a malformed file or config value, an incompatible checkpoint."""
