"""Adapters that run this library's routers inside other training stacks, without a fork of theirs.

- `moe_routing.integrations.megatron`: a router builder for Megatron-Core's ``MoESubmodules.router`` and a
  ready ``ModuleSpec`` (extra ``megatron``).

Each submodule imports its framework on import, so importing this package needs neither.
"""
