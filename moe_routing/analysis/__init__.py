"""Tools that study the routing of trained models without training them: local routing consistency (SRP, SCH)
and an expert-cache simulator over recorded routing (``experts_TLK``, the replay record's layout); routing
analysis (`collect_routing`: load, co-activation, token / position specialisation, cross-input divergence, plots); LocMoE's expert-capacity lower bound (`capacity_bound`)."""
from .capacity_bound import locmoe_assignment_probability, locmoe_min_capacity, min_assignment_cosine
from .cache import POLICIES, hit_rate_curve, plot_hit_rates, simulate_cache
from .lrc import sch, split_sequences, srp
from .collect import (RoutingCollection, Specialization, collect_routing, normalized_js, routing_divergence,
                      sequence_distributions)
from .plots import plot_routing

__all__ = ["RoutingCollection", "Specialization", "collect_routing", "normalized_js", "plot_routing",
           "routing_divergence", "sequence_distributions", "POLICIES", "hit_rate_curve", "plot_hit_rates", "sch", "simulate_cache", "split_sequences", "srp",
           "locmoe_assignment_probability", "locmoe_min_capacity", "min_assignment_cosine"]
