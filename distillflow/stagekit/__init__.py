"""What the stage modules share: the entry point, the generation stage body."""
