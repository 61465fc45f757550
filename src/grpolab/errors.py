"""grpolab's error types, low in the tree so that every layer raises them without importing the layers
above. The CLI turns a user's errors (`grpolab.runtime.failures.USER_ERRORS`: the first four here) into
`grpolab: error: …` and exit 2, `StudyError` and `TrackingError` into exit 1 (a retry may fix those)."""


class ConfigError(ValueError):
    """Bad params: the message names the key path (or file) that is wrong."""


class DataError(ValueError):
    """Bad input data: the message names the file, the column and the row."""


class RewardError(ValueError):
    """A reward that cannot be computed: the message names the row (its file and row) and the reason."""


class StudyError(RuntimeError):
    """Cells of a study failed (the report lists them)."""


class TrackingError(RuntimeError):
    """The tracking store stopped answering during a stage and was not back in time at its end: the message names
    the store and says how the stage goes on."""


class StageError(RuntimeError):
    """A grpolab process this one ran (a stage under `dvc repro`, a training process) stopped with a user's
    named error: the message is that error's, read back from the file the process wrote it to."""
