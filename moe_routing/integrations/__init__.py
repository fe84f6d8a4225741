"""Adapters that run this library's routers and kernels inside other training stacks, without a fork of theirs.
Each submodule is an optional extra imported on its own (never from here):

- ``moe_routing.integrations.hf``: Hugging Face transformers 5.x (extra ``hf``): the ``"moe_routing"`` experts
  implementation and `swap_routers`.
- ``moe_routing.integrations.megatron``: Megatron-Core (extra ``megatron``): a router builder for
  ``MoESubmodules.router`` and a ready ``ModuleSpec``; ``megatron_cpu``: megatron-core's MoE layer on a CPU over
  gloo (tests, CPU benchmarks).

This package imports no optional dependency, so ``import moe_routing`` works without either framework.
"""
