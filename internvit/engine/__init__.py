"""The one training infrastructure shared by both tasks: distributed set-up, schedules, EMA, loops, checkpoints."""
