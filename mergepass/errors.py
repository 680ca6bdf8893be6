"""What mergepass tells its users when it leaves part of a model as it was."""


class MergepassWarning(UserWarning):
    """The pass left (part of) a model unmerged, or chose a slower path; the model still runs correctly."""
