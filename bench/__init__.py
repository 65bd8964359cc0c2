"""`convserve-bench`: load generator, comparisons, the performance suite and its no-op server.

A development tool, not part of the server: `service` never imports it and the server image does not hold it.
"""
