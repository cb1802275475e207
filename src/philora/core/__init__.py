"""The ground floor every layer stands on: one-line user errors, the run config, atomic disk writes."""
