"""Data: sources, federated partitions, cohort assembly, the embedded `shapes` set.

Kept light: decode workers import this package, so nothing heavy is imported here.
"""
