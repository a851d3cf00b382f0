"""Planning a run before it starts: parameter counts, FLOPs, memory and checkpoint size
(`estimate`), the `--plan` report (`report`) and the pre-flight checks of the run's
directories (`preflight`)."""
