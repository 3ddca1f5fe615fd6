"""Benchmark cases for `bin/bench`: our op beside the TF built-in users would use."""
