"""The one error type users see: a single line naming the file or field and what was expected."""


class InsightADError(Exception):
    """A problem with the user's input or environment, reported as one clear line (no traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))
