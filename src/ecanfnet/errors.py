"""Exceptions a user can act on; kept free of heavy imports so the CLI can catch them cheaply."""


class WeightsError(RuntimeError):
    """A weights source could not be found, read or matched to the network."""


class BackendError(RuntimeError):
    """A backend or precision is not available here; the message says why and what to do."""


class EmbedError(RuntimeError):
    """An embedding run or search that cannot start or continue; the message names the file and what to do."""
