"""The one error type users see: a single line naming the file or field and what was expected."""


class InsightADError(Exception):
    """A problem with the user's input or environment, reported as one clear line (no traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))


MAX_MESSAGE = 2000  # characters of an error line shown to a user; the rest is cut


def cut(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` shortened to ``limit`` characters, saying how much was cut (a 20 MB field stays off the terminal)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters cut)"
