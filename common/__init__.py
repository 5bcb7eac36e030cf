"""Shared kit used by every trainer: run setup, train state, resume policy, checkpoints, schedules, metrics.

Importing it (before torch) makes OpenMP threads wait passively unless ``OMP_WAIT_POLICY`` is already set: with
the default busy-waiting, two torch threads on a 2-core machine that also runs other work spin against each other
and a demo epoch took 137 s instead of 10 s (measured); a trainer idle between parallel regions costs little.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
