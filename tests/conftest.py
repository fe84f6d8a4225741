import os

# The Triton backend runs on CPU under the interpreter; the variable must be set before any kernel module is
# imported (moe_routing imports them lazily, on first use of backend="triton").
os.environ.setdefault("TRITON_INTERPRET", "1")
