"""raydistill's core: config, shard format, soft-label math, KD losses, student builder, driver.

Public modules (import them directly; this package imports nothing heavy):
- `orchestrator.config`: `load_config`, `Config` and its sections
- `orchestrator.shards`: `read_shards`, `decode_table`, `write_shard`, the shard schema
- `orchestrator.manifest`: `Manifest`, `load_manifest`
- `orchestrator.capture_dirs`: `list_captures`, `find_capture` (an output_dir's capture folders)
- `orchestrator.softlabels`: `SoftLabels`, `topk_from_hidden`
- `orchestrator.losses`: `distill_loss`, `divergence`
- `orchestrator.student`: `resolve_shape`, `build_student`, `PRESETS`
- `orchestrator.pipeline`: `capture` (the driver; used by the CLI)
- `orchestrator.cli`: the `raydistill` command
- `orchestrator.program`: `command_name` (the program as the user can call it, for messages)
"""
