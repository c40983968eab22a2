"""gptj entry point: run the same command on every host.

    python main.py --config=gptj/configs/tiny.py --workdir=runs/tiny [--mode=train|eval|sample|serve|plan]

Any config field can be overridden: --config.train.total_steps=200.
"""

import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from gptj.core import runtime

MODES = ("train", "eval", "sample", "serve", "plan")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.DEFINE_string("mode", "train", f"One of {', '.join(MODES)}.")
# Multi-host: by default jax.distributed.initialize() discovers the cluster
# (TPU pod, SLURM); these flags name it explicitly for anything else.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for an explicit multi-host launch.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in an explicit multi-host launch.")
flags.DEFINE_integer("process_id", None, "This process's index in an explicit multi-host launch.")
flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for every host to join.")
# --mode=eval
flags.DEFINE_list("tasks", None, "lm-evaluation-harness tasks (default: config.eval.harness_tasks).")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per harness task (default: config.eval.num_fewshot).")
flags.DEFINE_integer("limit", None, "Examples per harness task (default: config.eval.limit; 0 = all).")
flags.DEFINE_string("include_path", None, "A folder of local lm-eval task YAMLs.")
# --mode=sample
flags.DEFINE_string("prompt", None, "Prompt to complete.")
flags.DEFINE_string("prompt_file", None, "File with one prompt per line.")
flags.DEFINE_string("output", None, "Write JSON lines {prompt, completion, token_ids} here.")
flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate (default: config.sample.max_new_tokens).")
flags.DEFINE_float("temperature", None, "0 means greedy (default: config.sample.temperature).")
flags.DEFINE_float("top_p", None, "Nucleus mass (default: config.sample.top_p).")
flags.DEFINE_integer("top_k", None, "0 disables top-k (default: config.sample.top_k).")
flags.DEFINE_integer("seed", None, "Sampling seed (default: config.sample.seed).")
# --mode=serve
flags.DEFINE_string("host", None, "Address to bind (default: config.serve.host, 127.0.0.1).")
flags.DEFINE_integer("port", None, "Port to bind (default: config.serve.port).")
# --mode=plan
flags.DEFINE_float("device_memory_gib", None, "Per-device memory to check the plan against.")
flags.DEFINE_enum("plan", "train", ["train", "serve"], "What to plan: the train step, or serving (bf16, int8, int4).")
flags.DEFINE_integer("batch_size", None, "--plan=serve: rows decoded together (default: config.serve.max_batch_size).")
flags.DEFINE_integer("context_len", None, "--plan=serve: tokens of context per row (default: the model's max_len).")
flags.DEFINE_string("target", None, "Plan for this hardware, compiled by its own compiler: tpu:v3-8, tpu:v3-256, "
                    "tpu:v4-8, tpu:v5e-8, tpu:v5p-8, tpu:v6e-8, gpu:h100, gpu:h100x8, gpu:h200x64, ...")

flags.mark_flags_as_required(["config"])


def _config_file_and_overrides(argv):
    """(config file path, dotted override names) as written on the command line."""
    path, overrides = None, []
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if name == "config" and "=" in arg:
            path = arg.split("=", 1)[1].split(":", 1)[0]
        elif name.startswith("config."):
            overrides.append(name[len("config."):])
    return path, overrides


def _unknown_override(argv) -> str | None:
    """The first --config.a.b override that names no field of the config file, as a message."""
    import importlib.util

    path, overrides = _config_file_and_overrides(argv)
    if not path or not overrides:
        return None
    try:
        spec = importlib.util.spec_from_file_location("_gptj_run_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception:  # the flag parser reports a broken config file itself
        return None
    for name in overrides:
        node = config
        for i, key in enumerate(name.split(".")):
            if not hasattr(node, "keys") or key not in node:
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                where = ".".join(name.split(".")[:i]) or "the config"
                return f"unknown config key {name!r} (--config.{name}): {where} has {known}"
            node = node[key]
    return None


def _parse_flags(argv):
    """absl flag parsing with one-line errors for bad --config overrides instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(f"error: {_unknown_override(argv) or f'bad --config override ({type(e).__name__}: {e})'}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from gptj.core.storage import quiet_storage_noise
    from gptj.errors import GptjError

    runtime.configure_console(FLAGS.verbosity)  # --verbosity=1 shows every library's log lines
    if FLAGS.verbosity < 1:  # and the background threads' traces behind a storage error
        quiet_storage_noise()
    try:
        _run(FLAGS.config, FLAGS.mode)
    except (GptjError, OSError) as e:  # bad input or a refused run; OSError: what the filesystem refused
        if FLAGS.verbosity >= 1:
            traceback.print_exc()
        sys.exit(f"error: {e}")


def _run(config, mode):
    from gptj.errors import ConfigError
    from gptj.settings import RunSettings, validate

    if mode not in MODES:
        raise ConfigError(f"unknown --mode={mode!r}; choose one of {', '.join(MODES)}")
    if mode != "plan" and not FLAGS.workdir:
        raise ConfigError("--workdir is required")
    runtime.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                       FLAGS.initialization_timeout)
    # The mode's own flags override their config section; then the settings are checked
    # before anything is built or compiled (train mode: also the optimizer, batch split, data tasks).
    settings = RunSettings.from_config(config)
    settings = settings.override("eval", num_fewshot=FLAGS.num_fewshot, limit=FLAGS.limit,
                                 include_path=FLAGS.include_path,
                                 harness_tasks=None if FLAGS.tasks is None else tuple(FLAGS.tasks))
    settings = settings.override("sample", max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                                 top_p=FLAGS.top_p, top_k=FLAGS.top_k, seed=FLAGS.seed)
    settings = settings.override("serve", host=FLAGS.host, port=FLAGS.port)
    settings = validate(settings, mode, workdir=FLAGS.workdir)

    if mode == "train":
        from gptj import train
        explicit = [k.split(".", 1)[1] for k in config_flags.get_override_values(FLAGS["config"])
                    if k.startswith("model.")]
        train.train_and_evaluate(settings, FLAGS.workdir, explicit_model_fields=explicit)
    elif mode == "eval":
        from gptj.evaluation import evaluate
        evaluate.evaluate(settings, FLAGS.workdir)
    elif mode == "sample":
        from gptj.inference import sampler
        sampler.sample_main(settings, FLAGS.workdir, prompt=FLAGS.prompt, prompt_file=FLAGS.prompt_file,
                            output=FLAGS.output)
    elif mode == "serve":
        from gptj.inference import server
        server.serve(settings, FLAGS.workdir)
    elif mode == "plan":
        from gptj import plan
        if FLAGS.plan == "serve":
            plan.print_serve_plan(settings, FLAGS.batch_size or settings.serve.max_batch_size,
                                  FLAGS.context_len or settings.model.max_len, FLAGS.device_memory_gib, FLAGS.target)
        else:
            plan.print_plan(settings, device_memory_gib=FLAGS.device_memory_gib, target=FLAGS.target)


if __name__ == "__main__":
    runtime.start_process()  # before jax, TensorFlow and the rest are imported
    app.run(main, flags_parser=_parse_flags)
