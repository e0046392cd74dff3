"""How long a test waits for a subprocess, or for something a subprocess does: a guard against a hang only,
never a budget for the work. A run that takes 30 s here must still pass on a machine ten times slower or
loaded by a parallel suite (pytest-xdist), so the guard is far above any duration a test's work takes; a
test whose claim is about time runs on a fake clock instead (tests/helpers/glide_test_probes.py's StepClock)."""

HANG_GUARD_S = 1800
