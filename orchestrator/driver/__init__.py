"""What users run: the CLI, the recipes (`pipeline`: capture, train, run, tune, publish) and their
steps (`capture_run`, `streaming`, `students`, `experiments`, `sweeps`), preflight, the cluster
connection, jobs, report, inspect, serving and the demo. The only layer that holds the whole
config, calls `ray.init`, sets a `runtime_env`, or imports `actors/`, `tune_spaces/` and `serve/`."""
