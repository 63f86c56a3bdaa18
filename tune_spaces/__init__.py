"""Search spaces (YAML data in this folder) and the Ray Tune sweep runner.

Public: `load_space`, `available`, `Space` (tune_spaces.spaces); `run_sweep` (tune_spaces.sweep);
`write_leaderboard` (tune_spaces.leaderboard). The pipeline (`raydistill tune CONFIG`) drives them.
"""

from tune_spaces.spaces import Space, available, load_space

__all__ = ["Space", "available", "load_space"]
