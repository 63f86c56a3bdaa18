"""Named Tune search spaces (YAML) and the sweep runner: issue 4, not built yet."""
