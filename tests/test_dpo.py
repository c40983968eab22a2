"""DPO (train.objective=dpo): the gptj_dpo task and its batches, the loss against TRL's DPOTrainer, the reference
under LoRA (no copy) and without (a copy), meshes, resume, the adapters out as PEFT, and one-line errors.

References: TRL's DPOTrainer (transformers + peft, PyTorch) computing the loss of the same pairs on the same
weights, exported through gptj's own HF and PEFT writers; single-device runs for the sharded ones. The learning
test (a rule the chosen answers follow, held-out pairs, greedy samples) is tests/test_examples.py's run of
examples/preference_tuning.py.
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trainer_utils import VOCAB, read_scalars, tiny_config

from gptj import dpo, recipe, train
from gptj.core.checkpoint import Checkpointer
from gptj.core.partitioning import Partitioner, make_mesh
from gptj.core.param_tree import merge_params, param_paths
from gptj.data import tasks
from gptj.data.pipeline import build_eval_iterators, build_train_iterator, host_dataset, translate_errors
from gptj.data.vocab import EOT_ID, get_tokenizer
from gptj.errors import ConfigError, DataError
from gptj.model import lora as lora_lib
from gptj.model.transformer import GPTJ, GPTJConfig, LoraConfig
from gptj.plan import format_plan, make_plan
from gptj.settings import DPOSettings, RunSettings, validate
from gptj.weights.formats.hf import write_hf
from gptj.weights.formats.peft import write_peft
from gptj.weights.params_dir import save_params
from gptj.weights.source import open_weights

SEQ = 16
ROWS = [
    {"prompt": "Request: open the door.\nResponse:", "chosen": " Sure, I will open it.", "rejected": " No.", "id": 1},
    None,  # a blank line
    {"prompt": "Summarise: " + " ".join(f"w{i}" for i in range(20)) + "\nSummary:", "chosen": " Words.",
     "rejected": " Many words, one after another."},  # longer than a record: the shared prompt is cut
    {"prompt": "Count:", "chosen": " 1", "rejected": "".join(f" {i}" for i in range(20))},  # skipped: too long
    {"prompt": "", "chosen": " Hello there.", "rejected": " Go away."},  # an empty prompt is allowed
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in rows))
    return str(path)


def expected_pairs(rows, seq_len=SEQ):
    """(tokens, mask) [2, seq_len + 1] of each kept pair, from the plain tokenizer and the documented rule."""
    tok = get_tokenizer()
    out = []
    for row in filter(None, rows):
        targets = [tok.encode(row[k]) + [EOT_ID] for k in ("chosen", "rejected")]
        longest = max(map(len, targets))
        if longest > seq_len:
            continue
        prompt = tok.encode(row["prompt"])
        prompt = prompt[max(0, len(prompt) - (seq_len + 1 - longest)):]
        tokens, mask = np.zeros((2, seq_len + 1), np.int32), np.zeros((2, seq_len + 1), np.int32)
        for i, target in enumerate(targets):
            tokens[i, :len(prompt) + len(target)] = prompt + target
            mask[i, len(prompt):len(prompt) + len(target)] = 1
        out.append((tokens, mask))
    return out


def records(name, **kwargs):
    with translate_errors(name):
        pairs = list(host_dataset(name, "train", with_mask=True, **kwargs).as_numpy_iterator())
    return np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs])


def dpo_config(train_path, val_path, **train_settings):
    from data_utils import make_config

    config = make_config(train_task="gptj_dpo", val_tasks=("gptj_dpo_validation",), seq_len=SEQ, batch_size=2,
                         dpo_pattern=train_path, dpo_val_pattern=val_path)
    config.train.update(dict(objective="dpo", **train_settings))
    return config


# -- the task and its batches --------------------------------------------------------------------------------------


def test_pair_records_share_the_prompt_and_mask_completions_and_eos(tmp_path, caplog):
    tasks.register_dpo_task("p_rows", write_jsonl(tmp_path / "prefs.jsonl", ROWS), SEQ)
    text, mask = records("p_rows")
    want = expected_pairs(ROWS)
    assert len(want) == 3 and text.shape == mask.shape == (3, 2, SEQ + 1) and text.dtype == np.int32
    for (tokens, marks), got_text, got_mask in zip(want, text, mask):
        np.testing.assert_array_equal(got_text, tokens)
        np.testing.assert_array_equal(got_mask, marks)
    tok = get_tokenizer()
    # Spelled out: both rows start with the same prompt; each mask covers its completion and EOS.
    prompt = tok.encode(ROWS[0]["prompt"])
    assert list(text[0, 0, :len(prompt)]) == list(text[0, 1, :len(prompt)]) == prompt
    assert tok.decode(text[0, 0, mask[0, 0] == 1]) == " Sure, I will open it.<|endoftext|>"
    assert tok.decode(text[0, 1, mask[0, 1] == 1]) == " No.<|endoftext|>"
    # The long prompt lost its start, the same tokens for both: the longer completion fills the record.
    assert (mask[1, 1] == 0).sum() == (mask[1, 0] == 0).sum() - (SEQ + 1 - mask[1, 0].sum() - (mask[1, 1] == 0).sum())
    assert text[1, 1, -1] == EOT_ID and np.array_equal(text[1, 0, :4], text[1, 1, :4])
    assert "1 had their prompt cut" in caplog.text and "1 were skipped" in caplog.text
    assert "prefs.jsonl row 4" in caplog.text


def test_batches_are_pairs_resume_exactly_and_validation_pads_whole_pairs(tmp_path):
    rows = [{"prompt": f"Question {i}:", "chosen": f" {i} is {i}.", "rejected": f" {i} is {i + 1}."} for i in range(7)]
    config = dpo_config(write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "val.jsonl", rows[:3]))
    tasks.register_tasks_for_config(config)
    it = build_train_iterator(config)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    following = next(it)
    for batch in first + [following]:
        assert batch["inputs"].shape == batch["targets"].shape == batch["loss_mask"].shape == (2, 2, SEQ)
        np.testing.assert_array_equal(batch["inputs"][..., 1:], batch["targets"][..., :-1])
        assert (batch["loss_mask"].sum(-1) > 0).all()
    resumed = build_train_iterator(config)
    resumed.set_state(state)
    got = next(resumed)
    for key in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(got[key], following[key])
    text, mask = records("gptj_dpo_validation")
    batches = list(build_eval_iterators(config)["gptj_dpo_validation"]())
    assert len(batches) == 2  # 3 pairs in batches of 2: the second pair of the last batch is padding
    np.testing.assert_array_equal(batches[0]["inputs"], text[:2, :, :-1])
    np.testing.assert_array_equal(batches[1]["loss_mask"][0], mask[2, :, 1:])
    assert not batches[1]["loss_mask"][1].any()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "chosen": " b"}\n', r"row 1: no 'rejected' field \(found \['chosen', 'prompt'\]\)"),
    ('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": "", "rejected": " c"}\n',
     r"row 2: field 'chosen' is empty"),
    ('{"prompt": "a", "chosen": " b", "rejected": ""}\n', r"row 1: field 'rejected' is empty"),
    ('\n{"prompt": "a", "chosen": " b", "rejected": " b"}\n',
     r"row 2: 'chosen' and 'rejected' are the same text, so the pair states no preference"),
    ('{"prompt": "a", "chosen": [" b"], "rejected": " c"}\n', r"row 1: field 'chosen' is list, not a string"),
])
def test_bad_rows_are_one_line_naming_file_and_row(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    tasks.register_dpo_task("p_bad", str(tmp_path / "bad.jsonl"), SEQ)
    with pytest.raises(DataError) as error:
        records("p_bad")
    assert "\n" not in str(error.value)
    assert error.match(rf"^{re.escape(str(tmp_path))}/bad\.jsonl: {message}$")


def test_config_errors_are_one_line(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS[:1])

    def error(config):
        config.train.batch_size = 8  # one pair per fake device
        with pytest.raises(ConfigError) as caught:
            validate(config, "train")
        assert "\n" not in str(caught.value)
        return str(caught.value)

    # No reference: no init_from (with or without a LoRA base to turn the adapters off on).
    for rank in (0, 4):
        config = dpo_config(path, path)
        config.lora.rank = rank
        assert error(config) == ("train.objective=dpo needs a reference model and none is given: set init_from to "
                                 "the weights to start from (hf:PATH, mtj:PATH or a gptj workdir / params directory); "
                                 "they are the reference (under LoRA the frozen base with the adapters off, otherwise "
                                 "a frozen copy in dpo.reference_dtype)")
    config = dpo_config(path, path)
    config.dpo.update(dict(beta=0.0, loss_type="ipo", label_smoothing=0.1, reference_dtype="int8"))
    assert re.fullmatch(r"dpo.beta must be positive, got 0.0; dpo.label_smoothing applies to loss_type='sigmoid' "
                        r"only, not 'ipo'; dpo.reference_dtype must be one of .*; train.objective=dpo needs .*",
                        error(config))
    config = dpo_config(path, path)
    config.dpo.loss_type = "kto"
    config.train.objective = "rlhf"
    assert "train.objective must be one of ('lm', 'dpo'), got 'rlhf'" in error(config)
    assert "dpo.loss_type must be one of ('sigmoid', 'ipo', 'hinge'), got 'kto'" in error(config)
    # The task must give what the objective trains on.
    config = dpo_config(path, path)
    config.init_from = f"hf:{tmp_path}"  # exists: the layout is checked once nothing else is wrong
    config.data.val_tasks = ()
    config.data.update(dict(train_task="gptj_sft", sft_pattern=write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "a", "completion": " b"}])))
    assert "task 'gptj_sft' gives single sequences: use gptj_dpo" in error(config)


# -- the loss against TRL's DPOTrainer -----------------------------------------------------------------------------

PARITY_MODEL = GPTJConfig(vocab_size=50257, vocab_pad_multiple=1, num_layers=2, d_model=32, num_heads=4, rotary_dim=4,
                          max_len=64, dtype="float32", param_dtype="float32", remat_policy="none")
PARITY_LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "fc_in"))
PARITY_ROWS = [
    {"prompt": "Request: open the door.\nResponse:", "chosen": " Sure, I will open the door.", "rejected": " No."},
    {"prompt": "Translate to French: cat =>", "chosen": " chat", "rejected": " chien, le chat noir"},
    {"prompt": "Q: What is two plus two? A:", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "Say hello:", "chosen": " Hello!", "rejected": " Goodbye, see you later."},
]


def random_params(config, seed, scale=0.05, lora=None):
    """Every weight random (LayerNorms and biases too), as numpy: a parity test then sees each of them."""
    init = GPTJ(config, lora=lora).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32),
                                  nn.meta.unbox(init))


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """The reference weights as an HF directory, a policy (the reference moved a little), LoRA adapters (as a PEFT
    directory) and the same adapters moved a little."""
    root = tmp_path_factory.mktemp("dpo_parity")
    reference = random_params(PARITY_MODEL, 0)
    policy = jax.tree_util.tree_map(lambda x, y: x + 0.5 * (y - x), reference, random_params(PARITY_MODEL, 1))
    adapters, moved = (lora_lib.split_adapters(random_params(PARITY_MODEL, seed, scale=0.2, lora=PARITY_LORA))[1]
                       for seed in (2, 3))
    moved = jax.tree_util.tree_map(lambda x, y: x + 0.5 * (y - x), adapters, moved)
    write_hf(reference, PARITY_MODEL, str(root / "reference"))
    write_hf(policy, PARITY_MODEL, str(root / "policy"))
    write_peft(adapters, PARITY_MODEL, PARITY_LORA, str(root / "adapters"))
    write_peft(moved, PARITY_MODEL, PARITY_LORA, str(root / "moved"))
    return root, {"copy": policy, "lora": adapters, "lora_init": moved}


def trl_values(root, mode: str, loss_type: str):
    """Per pair, TRL's loss, rewards and policy log-probs: DPOTrainer's own loss computation, one pair at a time.

    mode "copy": a policy model beside a reference model; "lora": a new PEFT adapter (TRL's reference: the
    adapters disabled), given our adapters' values; "lora_init": training an existing adapter further (TRL's
    reference: a copy of it), moved after the trainer is built.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.numpy import load_file
    from transformers import GPTJForCausalLM
    from trl import DPOConfig, DPOTrainer

    from gptj.data.vocab import hf_tokenizer
    from gptj.weights.formats.peft import ADAPTER_WEIGHTS

    base = GPTJForCausalLM.from_pretrained(root / "reference")
    kwargs = {}
    if mode == "copy":
        kwargs = dict(model=GPTJForCausalLM.from_pretrained(root / "policy"), ref_model=base)
    elif mode == "lora":
        peft_config = PeftLoraConfig(r=PARITY_LORA.rank, lora_alpha=PARITY_LORA.alpha, lora_dropout=0.0,
                                     target_modules=list(PARITY_LORA.targets))
        kwargs = dict(model=base, peft_config=peft_config)
    else:
        kwargs = dict(model=PeftModel.from_pretrained(base, str(root / "adapters"), is_trainable=True))
    args = DPOConfig(output_dir=str(root / f"trl_{mode}_{loss_type}"), beta=0.1, loss_type=loss_type,
                     report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=1)  # TRL: bf16 by default
    trainer = DPOTrainer(args=args, train_dataset=Dataset.from_list(PARITY_ROWS), processing_class=hf_tokenizer(),
                         **kwargs)
    if mode != "copy":  # the adapter being trained, as gptj's train state holds it
        weights = load_file(str(root / ("adapters" if mode == "lora" else "moved") / ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(trainer.model, {k: torch.from_numpy(v) for k, v in weights.items()})
        assert not result.unexpected_keys
    out = []
    with torch.no_grad():
        for example in trainer.train_dataset:
            batch = trainer.data_collator([example])
            loss = float(trainer._compute_loss(trainer.model, batch, return_outputs=False))
            metrics = trainer._metrics["train" if trainer.model.training else "eval"]  # as TRL files them
            chosen, rejected = (np.asarray(batch["input_ids"][i][batch["attention_mask"][i] == 1]) for i in (0, 1))
            out.append({"loss": loss, "tokens": (chosen, rejected),
                        **{key: metrics[key][-1] for key in dpo.METRIC_SUMS}})
    return out


def parity_settings(root, mode: str, loss_type: str) -> RunSettings:
    """A DPO run over the parity pairs (gptj_dpo_validation), one pair a batch, init_from the reference weights."""
    path = write_jsonl(root / f"rows_{mode}_{loss_type}.jsonl", PARITY_ROWS)
    config = dpo_config(path, path)
    config.init_from = f"hf:{root / 'reference'}"
    config.data.seq_len = 24  # every pair whole
    config.model.update(PARITY_MODEL.to_dict())
    config.train.update(dict(batch_size=1, val_batches=0, loss_chunk_tokens=8))  # the chunked head, 3 chunks a row
    config.dpo.update(dict(loss_type=loss_type, reference_dtype="float32"))
    if mode != "copy":
        start = f"peft:{root / 'adapters'}" if mode == "lora_init" else ""
        config.lora.update(dict(rank=PARITY_LORA.rank, alpha=PARITY_LORA.alpha, targets=PARITY_LORA.targets,
                                base_dtype="float32", init_from=start))
    return RunSettings.from_config(config)


def gptj_values(root, policy, mode: str, loss_type: str):
    """Per pair, gptj's loss, rewards and policy log-probs: the Trainer's eval step on the gptj_dpo task's batches,
    the reference as recipe.load_reference gives it."""
    settings = parity_settings(root, mode, loss_type)
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    trainer = recipe.build_trainer(settings, PARITY_MODEL, partitioner)
    weights = open_weights(f"hf:{root / 'reference'}")
    base = recipe.load_frozen_base(trainer, PARITY_MODEL, weights, "float32") if mode != "copy" else None
    identity = recipe.load_reference(trainer, settings, weights, base)
    if mode == "lora":  # the base with the adapters off: nothing of its own
        assert identity is None and not trainer.abstract_reference
    else:
        assert all(lora_lib.is_adapter(p) == (mode == "lora_init") for p in param_paths(trainer.abstract_reference))
    state = trainer.state_from_params(policy)
    tasks.register_tasks_for_config(settings)
    out = []
    for batch in build_eval_iterators(settings, partitioner)["gptj_dpo_validation"]():
        values = trainer.evaluate(state["params"], [batch])
        inputs, mask = np.asarray(batch["inputs"])[0], np.asarray(batch["loss_mask"])[0]
        ends = [np.nonzero(m)[0][-1] + 2 for m in mask]  # the EOS is the last target: one past the last input
        tokens = tuple(np.append(inputs[i, :ends[i] - 1], batch["targets"][0, i, ends[i] - 2]) for i in (0, 1))
        out.append({"tokens": tokens, **values})
    return out


@pytest.mark.parametrize("mode", ["copy", "lora", "lora_init"])
def test_loss_rewards_and_logps_equal_trls_dpo_trainer(parity, mode):
    """Acceptance 1: for sigmoid and ipo, per pair, gptj's loss, rewards and log-probs are TRL's (fp32, <= 1e-4):
    a full model against a reference copy, a new LoRA adapter (reference: the base, adapters off) and an adapter
    trained further (reference: its starting copy); and --mode=eval's validation means."""
    root, policies = parity
    # An adapter trained further differs from a new one in its reference only: sigmoid is enough there.
    for loss_type in ("sigmoid", "ipo") if mode != "lora_init" else ("sigmoid",):
        ours, theirs = gptj_values(root, policies[mode], mode, loss_type), trl_values(root, mode, loss_type)
        assert len(theirs) == len(ours) == len(PARITY_ROWS)
        for mine, trl in zip(ours, theirs):
            for a, b in zip(mine["tokens"], trl["tokens"]):  # the same sequences: prompt, completion, EOS
                np.testing.assert_array_equal(a, b)
            for key in ("loss", *dpo.METRIC_SUMS):
                assert mine[key] == pytest.approx(trl[key], abs=1e-4), (loss_type, key)
    assert len({round(v["rewards/margins"], 3) for v in ours}) == len(ours)  # the pairs differ: a real comparison
    assert all(abs(v["rewards/chosen"]) > 1e-3 for v in ours)  # and the policy is not its reference
    if mode == "copy":  # --mode=eval's validation of the policy: the means over the pairs, against init_from
        from gptj.evaluation.evaluate import validation_metrics

        partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
        got = validation_metrics(parity_settings(root, mode, "ipo"), policies[mode], PARITY_MODEL, partitioner)
        got = got["gptj_dpo_validation"]
        assert got["pairs"] == len(PARITY_ROWS)
        for key in ("loss", *dpo.METRIC_SUMS):
            assert got[key] == pytest.approx(np.mean([v[key] for v in theirs]), abs=1e-4), key


def test_label_smoothing_and_hinge_follow_their_formulas():
    """cDPO's smoothed sigmoid and the hinge, per pair, from the same log-probs (numpy, as TRL writes them)."""
    policy = np.array([[-10.0, -12.0], [-7.0, -5.5], [-3.0, -3.0]], np.float32)
    reference = np.array([[-11.0, -11.5], [-6.0, -6.0], [-3.5, -2.0]], np.float32)
    lengths = np.array([[4, 2], [3, 5], [0, 0]], np.float32)  # the last pair is padding
    delta = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    for settings, losses in (
            (DPOSettings(beta=0.2, label_smoothing=0.1),
             -0.9 * log_sigmoid(0.2 * delta) - 0.1 * log_sigmoid(-0.2 * delta)),
            (DPOSettings(beta=0.5, loss_type="hinge"), np.maximum(0.0, 1 - 0.5 * delta))):
        sums = dpo.pair_sums(jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(lengths), settings)
        assert float(sums["weight"]) == 2
        assert float(sums["loss_sum"]) == pytest.approx(losses[:2].sum(), rel=1e-6)
        assert float(sums["rewards_correct"]) == 1  # pair 0 prefers chosen, pair 1 rejected


# -- meshes, rule sets and the reference's memory --------------------------------------------------------------------


def lora_dpo_config(weights, **lora):
    config = tiny_config(total_steps=3, eval_every=0, seed=7, objective="dpo", batch_size=4)
    config.init_from = str(weights)
    config.model.update(dict(remat_policy="full"))
    config.lora.update({**dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "fc_in")), **lora})
    return config


def pair_batch(index, config):
    """A batch of in-memory pairs: the chosen completion counts upward from the prompt's last token, the rejected
    one is random; masks on the last 6 positions."""
    rng = np.random.default_rng([int(config.train.seed), index])
    pairs, seq = int(config.train.batch_size), int(config.data.seq_len)
    text = rng.integers(0, VOCAB, size=(pairs, 2, seq + 1)).astype(np.int32)
    text[:, 1, :-6] = text[:, 0, :-6]  # the shared prompt
    text[:, 0, -6:] = (text[:, 0, -7:-6] + np.arange(1, 7)) % VOCAB
    mask = np.zeros_like(text)
    mask[..., -6:] = 1
    return {"inputs": text[..., :-1], "targets": text[..., 1:], "loss_mask": mask[..., 1:].astype(np.float32)}


class PairIterator:
    """The train-iterator protocol (next, get_state, set_state) over `pair_batch`."""

    def __init__(self, config, partitioner=None):
        self.config, self.index = config, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.index += 1
        return pair_batch(self.index - 1, self.config)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def pair_eval_sets(config, partitioner=None):
    return {"pairs": lambda: iter([pair_batch(1000 + i, config) for i in range(2)])}


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """Random weights of trainer_utils' tiny shape as a gptj params directory."""
    path = tmp_path_factory.mktemp("dpo_base") / "params"
    model = RunSettings.from_config(tiny_config()).model
    save_params(str(path), random_params(model, 3, scale=0.02), model)
    return str(path)


def test_lora_dpo_runs_the_same_on_one_device_2x4_zero3_and_4x2_megatron(base_weights):
    """Acceptance 3: bf16 base, full remat, microbatches: the same losses on every mesh; no reference copy."""
    config = lora_dpo_config(base_weights, base_dtype="bfloat16")
    model = RunSettings.from_config(config).model
    losses = {}
    for data, size, rules, micro in ((1, 1, "megatron", 1), (2, 4, "zero3", 1), (4, 2, "megatron", 2)):
        config.train.microbatches = micro
        partitioner = Partitioner(make_mesh(data, size, devices=jax.devices()[:data * size]), rules)
        trainer = recipe.build_trainer(config, model, partitioner)
        weights = open_weights(base_weights)
        base = recipe.load_frozen_base(trainer, model, weights, "bfloat16")
        assert recipe.load_reference(trainer, config, weights, base) is None
        assert trainer.abstract_reference == {} and trainer.compile().reference == 0
        state = recipe.adapted_initial_state(trainer, model, base, config)
        run = []
        for index in range(3):
            state, metrics = trainer.train_step(state, pair_batch(index, config))
            run.append([float(metrics[k]) for k in ("loss", "rewards/margins", "logps/chosen")])
        losses[(data, size, rules)] = np.array(run)
    first = losses[(1, 1, "megatron")]
    assert first[0, 0] == pytest.approx(np.log(2), abs=1e-6)  # adapters start at zero: the policy is the reference
    assert first[-1, 0] < first[0, 0] and first[-1, 1] > 0
    for key, run in losses.items():
        np.testing.assert_allclose(run, first, rtol=0, atol=1e-5, err_msg=str(key))


@pytest.mark.parametrize("rank, trainable, own", [
    (4, "", []),                                             # fresh adapters: the base, adapters off
    (4, r".*_lora_[ab]|ln_f/.*", ["ln_f/bias", "ln_f/scale"]),  # + a base parameter that trains: a copy of it
    (0, "ln_f/.*", ["ln_f/bias", "ln_f/scale"]),             # train.trainable alone: the same
    (0, "", None),                                           # a full fine-tune: a copy of everything
])
def test_the_reference_holds_only_what_the_policy_changes(rank, trainable, own):
    config = lora_dpo_config("unused", rank=rank)
    config.train.trainable = trainable
    partitioner = Partitioner(make_mesh(2, 4), "zero3")
    trainer = recipe.build_trainer(config, RunSettings.from_config(config).model, partitioner)
    everything = param_paths(merge_params(trainer.abstract_state["params"], trainer.abstract_frozen))
    assert param_paths(trainer.abstract_reference) == ([p for p in everything if "_lora_" not in p]
                                                       if own is None else own)
    for leaf in jax.tree_util.tree_leaves(trainer.abstract_reference):  # in dpo.reference_dtype, sharded as trained
        assert leaf.dtype == jnp.bfloat16 and dict(leaf.sharding.mesh.shape) == {"stage": 1, "data": 2, "model": 4}


def test_the_plan_shows_the_reference_memory(base_weights):
    """--mode=plan: under LoRA no reference weights beyond the base; without, a copy in dpo.reference_dtype."""
    lora = lora_dpo_config(base_weights)
    lora.mesh.update(dict(data=2, model=4, rules="zero3"))
    plan = make_plan(lora)
    text = format_plan(plan, RunSettings.from_config(lora))
    assert plan.num_reference == 0 and plan.reference == 0 and plan.num_frozen > 0
    assert re.search(r"DPO reference params \(bfloat16\)\s+0\.000 GiB\s+0\.000 GiB", text)
    assert "DPO reference: the frozen base with the adapters off, no copy" in text
    assert "reference log-probs computed once instead: 0 GiB per device, 8 bytes a pair on the host" in text
    full = lora_dpo_config(base_weights, rank=0)
    full.mesh.update(dict(data=2, model=4, rules="zero3"))
    plan = make_plan(full)
    # bfloat16 beside the fp32 parameters, laid out alike; the arithmetic splits the small leaves too
    assert plan.num_reference == plan.num_params and plan.reference == plan.params // 2 > 0
    assert plan.reference_expected == pytest.approx(plan.reference, rel=0.05)
    assert "a frozen copy of init_from's" in format_plan(plan, RunSettings.from_config(full))


# -- workdirs: resume, the reference checked, LoRA out as PEFT ------------------------------------------------------


def _train(config, workdir):
    config.mesh.update(dict(data=2, model=4, rules="zero3"))
    return train.train_and_evaluate(config, str(workdir), train_iter_fn=PairIterator, eval_iters_fn=pair_eval_sets)


def test_full_dpo_resumes_exactly_and_checks_its_reference(base_weights, tmp_path):
    config = lora_dpo_config(base_weights, rank=0)
    config.train.update(dict(total_steps=4, eval_every=2, ckpt_every=2))
    assert _train(config, tmp_path / "straight") == "completed"
    config.train.total_steps = 2
    assert _train(config, tmp_path / "resumed") == "completed"
    config.train.total_steps = 4
    assert _train(config, tmp_path / "resumed") == "completed"
    assert Checkpointer(str(tmp_path / "resumed"), read_only=True).all_steps() == [2, 4]
    for a, b in zip(*(jax.tree_util.tree_leaves(open_weights(str(tmp_path / name)).numpy())
                      for name in ("straight", "resumed"))):
        np.testing.assert_array_equal(a, b)
    recorded = json.loads((tmp_path / "resumed" / "config.json").read_text())[recipe.REFERENCE_KEY]
    assert recorded["spec"] == base_weights
    accuracy = read_scalars(str(tmp_path / "straight" / "tensorboard"), "val/pairs/rewards/accuracies")
    assert sorted(accuracy) == [0, 2, 4] and accuracy[4] > accuracy[0]
    # Resumed over other weights: the reference changed, one line and no step taken.
    other = tmp_path / "other"
    model = RunSettings.from_config(config).model
    save_params(str(other), random_params(model, 4, scale=0.02), model)
    config.init_from, config.train.total_steps = str(other), 6
    with pytest.raises(ConfigError, match=r"was trained against the DPO reference .* a different reference; resume "
                                          r"with the original$"):
        _train(config, tmp_path / "resumed")


def test_to_peft_exports_a_dpo_lora_run(base_weights, tmp_path):
    """A LoRA DPO workdir leaves as a PEFT adapter whose model gives gptj's logits (HF GPT-J + peft)."""
    import torch
    from peft import PeftModel
    from transformers import GPTJForCausalLM

    from gptj.convert.__main__ import main as convert
    from gptj.weights.source import load_for_inference

    config = lora_dpo_config(base_weights, base_dtype="float32")
    config.train.total_steps = 2
    assert _train(config, tmp_path / "run") == "completed"
    for command in (["to_hf", f"--workdir={base_weights}", f"--out={tmp_path / 'hf'}"],
                    ["to_peft", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'peft'}"]):
        assert convert(command) == 0
    tokens = pair_batch(0, config)["inputs"][:, 0]
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    params, model = load_for_inference(config, str(tmp_path / "run"), partitioner)
    ours = np.asarray(GPTJ(model).apply({"params": params}, tokens))[..., :VOCAB]
    peft_model = PeftModel.from_pretrained(GPTJForCausalLM.from_pretrained(tmp_path / "hf"), str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = peft_model.eval()(torch.as_tensor(tokens)).logits.numpy()[..., :VOCAB]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    before = np.asarray(GPTJ(model).apply({"params": open_weights(base_weights).numpy()}, tokens))[..., :VOCAB]
    assert np.abs(ours - before).max() > 1e-3  # the adapters trained: the comparison is not the base's
