"""DeepSpeed-facing parts: ``zero`` (the only module importing deepspeed), backbone loading,
the replicated gate logits and the bi-level step. Importing this package imports DeepSpeed."""
