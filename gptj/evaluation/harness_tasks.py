"""lm-evaluation-harness tasks, offline: finding them, loading their data, running them, reading the scores.

gptj never downloads a data set during evaluation. A task whose data is not on
the machine, or a name the harness does not know, stops the run before any
weights are read, with one paragraph that says how to point the task at local
files (a folder of task YAMLs passed as `--include_path`, each with
`dataset_path: json` and `dataset_kwargs.data_files`).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Sequence
from unittest import mock

from absl import logging

from gptj.errors import EvalError

_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def force_offline() -> None:
    """Makes `datasets` and the Hub client refuse the network, unless the user explicitly allowed it.

    Setting HF_DATASETS_OFFLINE=0 (or HF_HUB_OFFLINE=0) in the environment opts
    back into downloads. The modules read these variables on import, so their
    flags are updated too in case they were imported first.
    """
    if any(os.environ.get(name, "").strip() in ("0", "false", "False") for name in _OFFLINE_VARS):
        return
    for name in _OFFLINE_VARS:
        os.environ[name] = "1"
    import datasets.config
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    with _builtin_index_from_cache() if include_defaults else contextlib.nullcontext():
        return TaskManager(include_path=include_path or None, include_defaults=include_defaults)


def index_cache_dir() -> str:
    """Where lm-eval's index of its built-in tasks is cached ($XDG_CACHE_HOME/gptj, else ~/.cache/gptj)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gptj", "lm_eval_task_index")


def cached_index(directory: str, build: Callable[[list], dict], cache_dir: str) -> dict:
    """`build([directory])`, lm-eval's index of the task YAMLs under `directory`, kept in a file of `cache_dir`.

    Parsing the harness's ~15k built-in YAMLs takes 25-50 s on a CPU core at
    every start of an evaluation; the file is named after the YAMLs' paths,
    sizes and modification times and lm-eval's version, so an edited, added
    or removed YAML (or another lm-eval) builds it anew, replacing the old
    file. A file that cannot be read or written is rebuilt or skipped, never
    an error.
    """
    import lm_eval

    where = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    key = hashlib.sha256(lm_eval.__version__.encode())
    for folder, subfolders, files in os.walk(directory):
        subfolders.sort()
        for name in sorted(files):
            if name.endswith(".yaml"):
                stat = os.stat(os.path.join(folder, name))
                key.update(f"{folder}/{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    path = os.path.join(cache_dir, f"{where}-{key.hexdigest()[:16]}.pickle")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:  # noqa: BLE001 - missing, partly written or from an incompatible lm-eval: build it
        pass
    index = build([Path(directory)])
    try:
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "wb") as f:
            pickle.dump(index, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, path)  # readers never see a partial file
        for stale in os.listdir(cache_dir):  # the same folder's index as it was before
            if stale.startswith(where) and stale.endswith(".pickle") and stale != os.path.basename(path):
                os.remove(os.path.join(cache_dir, stale))
    except OSError as e:
        logging.info("not caching lm-eval's task index in %s: %s", cache_dir, e)
    return index


@contextlib.contextmanager
def _builtin_index_from_cache():
    """While a TaskManager is built, its index of the harness's built-in tasks comes from `cached_index`.

    lm-eval has no public hook for this: it swaps the index builder that
    `lm_eval.tasks.manager` calls (`TaskIndex.build(paths)`, built-in folder
    first, then include_path folders, later ones overriding), and does nothing
    where a future lm-eval is laid out otherwise.
    """
    try:
        from lm_eval.tasks import manager
        build = manager.TaskIndex.build
    except (ImportError, AttributeError):
        yield
        return
    builtin = os.path.dirname(os.path.abspath(manager.__file__))

    def build_with_cache(paths, **options):
        paths = list(paths)
        if options or not paths or os.path.abspath(str(paths[0])) != builtin:
            return build(paths, **options)
        index = dict(cached_index(builtin, build, index_cache_dir()))
        index.update(build(paths[1:]) if paths[1:] else {})
        return index

    with mock.patch.object(manager.TaskIndex, "build", staticmethod(build_with_cache)):
        yield


def _example_yaml(data_file: str, split: str = "test") -> str:
    return (f"`dataset_path: json`, `dataset_name: null`, "
            f"`dataset_kwargs: {{data_files: {{{split}: {data_file}}}}}`, `{split}_split: {split}`")


def _unknown_task_message(names: Sequence[str], known: Sequence[str], include_path: str) -> str:
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        if close:
            hints.append(f"For {name!r} did you mean {', '.join(close)}?")
    where = f"nor defined by a task YAML under --include_path={include_path}" if include_path else \
        "and no --include_path (config.eval.include_path) names a folder of local task YAMLs"
    example = names[0]
    return (
        f"unknown lm-evaluation-harness task{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}: "
        f"not among the harness's {len(known)} built-in tasks, groups and tags, {where}. "
        + (" ".join(hints) + " " if hints else "")
        + "To evaluate on your own data, write a YAML file in a folder, for example "
        f"my_tasks/{example}.yaml with `task: {example}`, {_example_yaml(f'/data/{example}/test.jsonl')}, "
        "`output_type: loglikelihood` (or multiple_choice, loglikelihood_rolling, generate_until), "
        "`doc_to_text`, `doc_to_target` and a `metric_list`, and pass the folder with --include_path=my_tasks "
        "(`python -m lm_eval ls tasks` lists the built-in names).")


def _missing_data_message(name: str, entry, error: Exception) -> str:
    cfg = getattr(entry, "cfg", None) or {}
    dataset = cfg.get("dataset_path")
    dataset_desc = f"the data set {dataset!r}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "") \
        if dataset else "a data set"
    yaml_path = getattr(entry, "yaml_path", None)
    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    cause = " ".join(f"{type(error).__name__}: {error}".split())
    if len(cause) > 300:
        cause = cause[:297] + "..."
    return (
        f"lm-evaluation-harness task {name!r} reads {dataset_desc}, which is not on this machine, and gptj "
        "evaluates offline (HF_DATASETS_OFFLINE=1: nothing is downloaded). Point the task at local files: copy "
        f"its YAML{f' ({yaml_path})' if yaml_path else ''} into a folder of your own, keep `task: {name}` "
        "(a task under --include_path replaces the built-in one of the same name) and set "
        f"{_example_yaml(f'/data/{name}/{split}.jsonl', split)}, where the file holds one JSON object per "
        "line with the fields that its doc_to_text / doc_to_target read; then run with "
        "--include_path=<that folder> (config.eval.include_path). Alternatively copy the data set into this "
        "machine's Hugging Face datasets cache, or set HF_DATASETS_OFFLINE=0 where downloading is allowed. "
        f"(datasets said: {cause})")


def load_tasks(names: Sequence[str], include_path: str = ""):
    """Resolves task names (globs allowed, YAML paths too) and builds their Task / Group objects.

    Returns `(task_manager, objects)`. Tasks defined under `include_path` are
    found without indexing the harness's ~15k built-in YAMLs (seconds);
    the built-in index is read only when a name is not local.
    Raises EvalError for unknown names and for data that is not on the machine.
    """
    force_offline()
    if include_path and not os.path.isdir(include_path):
        raise EvalError(f"--include_path={include_path} is not a folder; it should hold lm-eval task YAML files")
    paths = [n for n in names if n.endswith((".yaml", ".yml")) and os.path.isfile(n)]
    patterns = [n for n in names if n not in paths]
    manager = _task_manager(include_path, False) if include_path else None
    if manager is None or any(not manager.match_tasks([p]) for p in patterns):
        manager = _task_manager(include_path, True)
    unknown = [p for p in patterns if not manager.match_tasks([p])]
    if unknown:
        raise EvalError(_unknown_task_message(unknown, manager.all_tasks, include_path))
    resolved = [t for p in patterns for t in manager.match_tasks([p])] + paths

    from datasets.exceptions import DatasetNotFoundError

    objects = []
    for name in dict.fromkeys(resolved):
        try:
            loaded = manager.load([name])
        except (OSError, DatasetNotFoundError) as e:  # ConnectionError (offline Hub), missing local files
            raise EvalError(_missing_data_message(name, manager.task_index.get(name), e)) from e
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        else:  # a task, or a tag that expands to several tasks
            objects.extend(loaded["tasks"].values())
    return manager, objects


def run_tasks(lm, names: Sequence[str], *, include_path: str = "", num_fewshot: int | None = None,
              limit: int = 0, bootstrap_iters: int | None = None, log_samples: bool = False,
              seed: int = 0, loaded=None) -> dict[str, Any]:
    """Runs lm-evaluation-harness tasks on `lm` and returns the harness's results dictionary.

    `limit` 0 means every example; `bootstrap_iters` None, the harness's own
    default (a run passes its `eval.bootstrap_iters`). The seeds are the harness's defaults
    shifted by `seed`, identical on every host, so few-shot examples match.
    `loaded` reuses what `load_tasks(names, include_path)` returned.
    """
    import lm_eval

    manager, objects = loaded or load_tasks(names, include_path)
    options = {} if bootstrap_iters is None else {"bootstrap_iters": bootstrap_iters}
    return lm_eval.simple_evaluate(
        **options, model=lm, tasks=objects, task_manager=manager, num_fewshot=num_fewshot, limit=limit or None,
        log_samples=log_samples, random_seed=seed,
        numpy_random_seed=1234 + seed, torch_random_seed=1234 + seed, fewshot_random_seed=1234 + seed)


def flatten_metrics(results: dict[str, Any], prefix: str = "harness") -> dict[str, float]:
    """`{prefix}/{task}/{metric}` -> value for every numeric score (stderr left out), for metric writers.

    The harness names metrics `acc,none`; the `,none` filter suffix is dropped,
    any other filter is kept as `metric_filter`.
    """
    flat = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                # Scores are "metric,filter"; bookkeeping such as sample_len has no filter.
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt in ("", "none") else f"{metric}_{filt}"
                flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


def write_results(results: dict[str, Any], out_dir: str, tag: str | None = None) -> str:
    """Writes the harness's results (and per-sample outputs, when logged) under `out_dir`; returns the path.

    Call on process 0 only. Files: `results_<tag>.json` and
    `samples_<task>_<tag>.jsonl`; `tag` defaults to a UTC timestamp.
    """
    from lm_eval.utils import handle_non_serializable

    tag = tag or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    os.makedirs(out_dir, exist_ok=True)
    samples = results.get("samples") or {}
    summary = {k: v for k, v in results.items() if k != "samples"}
    path = os.path.join(out_dir, f"results_{tag}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=handle_non_serializable)
    for task, rows in samples.items():
        with open(os.path.join(out_dir, f"samples_{task}_{tag}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable) + "\n")
    logging.info("evaluation results written to %s", path)
    return path
