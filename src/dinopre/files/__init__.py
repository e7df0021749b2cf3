"""What a run leaves on disk: checkpoints and their schema, the run directory, exports."""
