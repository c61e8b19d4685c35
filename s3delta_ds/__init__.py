"""s3delta_ds: Sparse Structure Search for Delta Tuning (S3Delta / S3PET) on DeepSpeed ZeRO-3.

Importing the package has no side effects (no GPU, environment or logging setup)."""

__version__ = "0.1.0"
