from .capacity import capacity, capacity_keep
from .dispatcher import LocalDispatcher, TokenDispatcher, weighted_combine
from .experts import GroupedExperts, grouped_mm
from .layer import MoELayer
from .router import Router, Routing
from .stats import MoEStats

__all__ = ["MoELayer", "MoEStats", "Router", "Routing", "GroupedExperts", "LocalDispatcher", "TokenDispatcher",
           "weighted_combine", "grouped_mm", "capacity", "capacity_keep"]
