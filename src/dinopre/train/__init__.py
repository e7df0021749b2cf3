"""Running a run: building its parts, the training loop, resume, evaluation, device set-up, trackers."""
