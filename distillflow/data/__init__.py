"""Prompt sources, the train/eval split, synthesis, pairing, curation filters and the quarantine."""
