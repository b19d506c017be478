"""The labelling job: wiring, map steps, Ray session, resume, leases, incremental runs, the run's end."""
