"""Distillation losses, the methods built from them, and the pieces every training loop shares."""
