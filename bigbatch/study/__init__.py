"""Many runs -> one answer: sweeps, the critical-batch-size fit, reports."""
