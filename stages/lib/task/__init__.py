"""The embedded toy task: skills, prompts and verifiable answers."""
