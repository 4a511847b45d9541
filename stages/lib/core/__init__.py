"""Params loading, the shared params sections, model references and loading, and the entry point every stage shares."""
