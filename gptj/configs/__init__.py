"""Run configs: `base.py` holds every default; one file per model or run changes what differs.

`load_config("tiny")` returns the ConfigDict of `gptj/configs/tiny.py` (what
`main.py --config=gptj/configs/tiny.py` reads), for scripts and config files
that start from a built-in one.
"""

import importlib
import pkgutil


def available() -> list[str]:
    """Names of the built-in configs."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def load_config(name: str):
    """The ConfigDict of the built-in config `name` (e.g. "tiny", "gptj_6b")."""
    if name not in available():
        raise ValueError(f"unknown config {name!r}; built-in configs are {available()}")
    return importlib.import_module(f"gptj.configs.{name}").get_config()
