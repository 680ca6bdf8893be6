"""Static token schedules: what every block merges, computed offline from the recipe and the graph."""
from .build import make_schedule
from .schedule import Schedule

__all__ = ["Schedule", "make_schedule"]
