"""Token dispatchers: the seam between a layer's routing decision and its experts.

`LocalDispatcher` (the default) keeps every expert on this device.
"""
from .base import DispatchMeta, Dispatcher
from .local import LocalDispatcher

__all__ = ["Dispatcher", "DispatchMeta", "LocalDispatcher"]
