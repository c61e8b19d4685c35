"""The exception hierarchy: every error a user can cause is an ``S3DeltaError`` with a message
that names the bad value and what to do about it. The CLI turns these into exit code 2."""


class S3DeltaError(Exception):
    """Base class of every error s3delta_ds raises on purpose."""


class ConfigError(S3DeltaError):
    """A setting (YAML, CLI flag, DeepSpeed json) is missing, misspelt or out of range."""


class BackboneError(S3DeltaError):
    """The backbone cannot be used: unknown architecture, missing module, unreadable config."""


class SearchSpaceError(S3DeltaError):
    """A search space, site name or delta type does not fit the backbone."""


class BudgetError(S3DeltaError):
    """A parameter budget that no structure of the space can meet."""


class StructureError(S3DeltaError):
    """A structure JSON file is malformed or does not match the backbone it is used with."""


class CheckpointError(S3DeltaError):
    """A checkpoint or delta file is missing, incomplete or from a different run."""


class DistributedSetupError(S3DeltaError):
    """The distributed launch or the ZeRO configuration cannot run what was asked."""


class DataError(S3DeltaError):
    """Training or evaluation data is missing, empty or lacks a needed field."""


class TrainingError(S3DeltaError):
    """Training diverged (NaN/inf loss) or otherwise cannot continue."""


class RunStopped(S3DeltaError):
    """A signal (preemption, the time limit) stopped the run after it wrote a checkpoint: not a
    failure of the input, and not a finished run either. Continue it with ``--resume``."""

    def __init__(self, message: str, signum: int, step: int) -> None:
        super().__init__(message)
        self.signum, self.step = signum, step

    def __reduce__(self):  # pickled across processes (a pool, concurrent.futures) with its fields
        return type(self), (str(self), self.signum, self.step), self.__dict__


class FoldError(S3DeltaError):
    """A delta cannot be folded into its host module (a non-linear type, or no bias to hold it)."""
