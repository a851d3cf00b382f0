"""Checkpoints: the commit record and its verification (`store`), the background writer
(`writer`, with the training thread's `snapshot`), the verified reader (`read`) and what may
change between a checkpoint and the run resuming it (`resume_check`)."""
