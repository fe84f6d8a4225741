"""Pretraining ablations: small MoE language models compared across routers (``moe-ablate``)."""
