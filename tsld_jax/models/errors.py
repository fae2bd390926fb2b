"""Errors raised for user mistakes (bad paths, bad files): the CLIs print them in one line."""


class LoadError(Exception):
    """A model could not be loaded: missing path, bad file, unsupported architecture."""
