"""Lineage manifests and run records, and the Great Expectations quality gates."""
