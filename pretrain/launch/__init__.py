"""Launch helpers that run outside the trainer: the auto-resume wrapper (`autoresume`).

The shell launchers themselves live in `launch/` at the repository root.
"""
