"""Errors, params loading, the shared params sections, records and their ids, checked I/O, models."""
