"""What mergepass tells its users when it leaves part of a model as it was."""


class MergepassWarning(UserWarning):
    """The pass left (part of) a model unmerged, or chose a slower path; the model still runs correctly."""


def briefly(e: BaseException) -> str:
    """An exception as one line for a warning: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
