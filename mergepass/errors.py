"""What mergepass tells its users when it leaves part of a model as it was."""
import warnings
from typing import Callable, Optional


class MergepassWarning(UserWarning):
    """The pass left (part of) a model unmerged, or chose a slower path; the model still runs correctly."""


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
