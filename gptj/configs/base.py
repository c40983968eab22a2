"""Defaults for every run; model and run files start from `get_config()` and change what differs.

Each section and field, its type, default and meaning, is in gptj/settings.py
(the model section's in gptj.model.transformer.GPTJConfig): this ConfigDict
is `RunSettings()` as ml_collections holds it, so every field is overridable
on the command line, e.g. `--config.optimizer.lr=3e-4 --config.mesh.model=8`.
"""

import ml_collections

from gptj.settings import RunSettings


def get_config() -> ml_collections.ConfigDict:
    return RunSettings().to_config()
