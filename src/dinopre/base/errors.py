"""Errors a user can fix. The CLI turns them into one sentence and exit code 2, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (flags, config file, data, output folder) that they can fix.

    The message is a complete sentence that says what is wrong and what to do.
    """


class ConfigError(UserError):
    """An invalid setting: a bad value, an unknown key, or settings that contradict each other."""


class DataError(UserError):
    """The training data cannot be used: a missing or empty folder, no supported images."""


class CheckpointError(UserError):
    """A checkpoint or export file that cannot be used: missing, corrupt, unsafe, of another kind, or holding
    values that are not what its kind promises."""


class RunDirError(UserError):
    """The output folder cannot be used as asked (it holds a run already, or it is not writable)."""


class RunComplete(Exception):
    """A resume of a run that has done all its epochs: nothing is left to train, which is not a failure (exit code
    0, so that a requeued job or a "resume until done" loop ends well). The message says how to export the run and
    how to train it longer."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept. The message says why."""


class Interrupted(Exception):
    """The run stopped on SIGINT or SIGTERM after saving a checkpoint; the message says how to resume.

    Attributes:
        exit_code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells report it.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
