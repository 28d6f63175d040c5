"""The aggregator hot path in Cython and its pure-Python/numpy twin."""
