"""The methods that ``kdfast bench --e2e`` measures against an eager peer.

Torch-free, so that ``kdfast bench --help`` lists them without importing torch;
``kdfast.engine.bench`` defines a peer for each, in this order.
"""

METHODS = ("kd", "at", "dkd", "sp", "rkd", "lcc", "lakd", "afd", "reviewkd", "crd")
