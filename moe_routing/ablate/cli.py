"""Placeholder replaced by the ablation CLI."""


def main() -> int:
    raise SystemExit("moe-ablate is not built yet")
