"""raydistill's core and driver. The layers (docs/architecture.md; import-linter keeps them):

- `orchestrator.driver`: what users run — the `raydistill` CLI, the recipes (`driver.pipeline`),
  capture execution, preflight, cluster, jobs, report, inspect, serving, the demo.
- `orchestrator.train`: the Ray Train loop (`train.loop`, `train.launch`) and shard-fed streams.
- `orchestrator.shards`: the shard format (`read_shards`, `decode_table`, `write_shard`), the
  manifest, capture planning and what a capture asks of a teacher.
- `orchestrator.kd`: soft-label math (`kd.softlabels`), KD losses (`kd.losses`), batches, the
  student builder (`kd.student`), evaluation — pure torch, no Ray.
- the root: `config` (`load_config`, `Config`), `data`, `errors`, `shapes` (student presets and
  the size estimator), `storage` (filesystems, atomic writes), `console` (`say`), `winners` (the
  tune → serve contract), `teacher_info`, `paths`, `program`.

This package imports nothing heavy; import the modules directly.
"""
