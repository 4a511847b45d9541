"""What the stages share, by concern: core, data, engines, training, evaluation, audit, task."""
