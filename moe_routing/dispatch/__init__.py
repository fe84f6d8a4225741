"""Token dispatchers: the seam between a layer's routing decision and its experts.

`LocalDispatcher` (the default) keeps every expert on this device; `AllToAllDispatcher` shards experts over an
expert-parallel process group and exchanges tokens with all-to-all. `reshard_expert_state_dicts` re-shards a
checkpoint to another expert-parallel size.
"""
from .all_to_all import AllToAllDispatcher
from .base import DispatchMeta, Dispatcher, expert_groups
from .local import LocalDispatcher
from .sharding import ShardedExperts, reshard_expert_state_dicts

__all__ = ["Dispatcher", "DispatchMeta", "LocalDispatcher", "AllToAllDispatcher", "ShardedExperts",
           "reshard_expert_state_dicts", "expert_groups"]
