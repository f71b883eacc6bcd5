"""Exceptions a user can act on; kept free of heavy imports so the CLI can catch them cheaply."""


class WeightsError(RuntimeError):
    """A weights source could not be found, read or matched to the network."""


class BackendError(RuntimeError):
    """A backend or precision is not available here; the message says why and what to do."""


class ShardError(RuntimeError):
    """A resumable sharded run (embed, predict --output) that cannot start or continue, or would replace a file
    it did not write; the message names the file and what to do."""


class EmbedError(ShardError):
    """An embedding run or search that cannot start or continue; the message names the file and what to do."""


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the file and the reason."""


class ImageTooLarge(ImageLoadError):
    """An image over the pixel limit, refused before decoding."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable data); the message says where and why."""


class QuantizeError(RuntimeError):
    """Quantization cannot start, or its result failed the accuracy guard; the message says which and why."""


class QuantizeRefused(QuantizeError):
    """The INT8 model failed the accuracy guard and was not written; .report holds the measurements."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


class PublishError(RuntimeError):
    """A folder that cannot be published, or a push that cannot start or failed; one line naming the file or why."""
