"""The Great Expectations quality gates, lineage manifests and run records, OpenLineage events."""
