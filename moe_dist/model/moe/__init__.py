from .capacity import capacity, capacity_keep
from .dispatch import LocalDispatcher
from .experts import GroupedExperts, grouped_mm
from .layer import MoELayer
from .router import Router, Routing

__all__ = ["MoELayer", "Router", "Routing", "GroupedExperts", "LocalDispatcher", "grouped_mm", "capacity", "capacity_keep"]
