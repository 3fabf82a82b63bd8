"""Build and bundle steps, layer 6: each takes what the order (pipeline.py) or a command hands
it and returns a result; none knows the order of a build.

    judge.py     one artifact: export, run in its runtime, parity, budgets, fallback, golden I/O
    speed.py     a quantized artifact against its float sibling, side by side; slower_than_float
    validate.py  re-run a bundle's parity from the bundle alone
    ingest.py    merge a device report into a bundle's manifest
"""
