"""Optimizers (report §3): Muon for matrices, AdamW for embeddings, head, norms, mHC biases and gates."""

from dsv4.optim.groups import CombinedOptimizer, build_optimizer, describe_groups, group_of, split_param_groups
from dsv4.optim.muon import HYBRID_NS_COEFFICIENTS, Muon, hybrid_newton_schulz

__all__ = ["CombinedOptimizer", "HYBRID_NS_COEFFICIENTS", "Muon", "build_optimizer", "describe_groups", "group_of",
           "hybrid_newton_schulz", "split_param_groups"]
