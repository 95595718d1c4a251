"""Pure, synchronous, deterministic protocol logic.

Nothing in this package does I/O, reads a clock, draws randomness or logs: time (`now`) and
randomness (`rng`) are parameters, and results are returned as values or events.
"""
