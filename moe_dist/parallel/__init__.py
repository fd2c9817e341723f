"""Parallelism applied from outside the plain model: process groups, all-to-all dispatch, gradient reduction."""
from .data_parallel import GradReducer, clip_grad_norm_, reduce_expert_loads, split_parameters, update_expert_bias
from .dispatch import AllToAllDispatcher, CommStats, all_to_all
from .groups import ProcessGroupManager, check_layout
from .parallelize import dispatchers, parallelize

__all__ = ["ProcessGroupManager", "check_layout", "AllToAllDispatcher", "CommStats", "all_to_all", "parallelize",
           "dispatchers", "GradReducer", "split_parameters", "clip_grad_norm_", "reduce_expert_loads",
           "update_expert_bias"]
