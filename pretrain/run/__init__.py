"""One training run: process group -> data -> model -> DeepSpeed engine -> resume -> the loop
(`trainer`), with the engine (`engine`: the only deepspeed.initialize), the run's data (`data`),
the learning-rate schedule, the step ledger, stop signals, faults of the run, the monitor
(console, TensorBoard, metrics.jsonl) and the run directory's lock."""
