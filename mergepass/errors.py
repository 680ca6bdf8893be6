"""What mergepass tells its users when it leaves part of a model as it was."""
import warnings
from typing import Callable, Optional


class MergepassWarning(UserWarning):
    """The pass left (part of) a model unmerged, or chose a slower path; the model still runs correctly."""


class Say:
    """Says MergepassWarnings; with ``once``, each text once (dynamo may hand a backend the same frame again).
    Stages take one as ``warn`` and call it with the message."""

    def __init__(self, once: bool = True, stacklevel: int = 3):
        self.once, self.stacklevel = once, stacklevel
        self.said: set[str] = set()

    def __call__(self, message: str) -> None:
        if not (self.once and message in self.said):
            self.said.add(message)
            warnings.warn(message, MergepassWarning, stacklevel=self.stacklevel)


def briefly(e: BaseException) -> str:
    """An exception as one line for a warning: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def replay(caught: list, warn: Optional[Callable[[str], None]] = None) -> list[str]:
    """Re-issue warnings recorded during a stage (MergepassWarnings through ``warn`` when given); returns
    the MergepassWarnings' texts, to be said again when a cached result is used."""
    said = []
    for w in caught:
        if issubclass(w.category, MergepassWarning):
            said.append(str(w.message))
            if warn is not None:
                warn(said[-1])
                continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return said
