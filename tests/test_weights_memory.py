"""Peak host memory of the paths that stream weights, on a random 1.2 GiB GPT-J (acceptance of issue 17).

Each path runs in a fresh process (`benchmarks/weights_memory.measure`): it imports what it
needs, resets its peak resident memory, runs, and reports its peak (VmHWM) above that
baseline. Converting (from_hf, to_hf, quantize to int8) holds a few blocks, never the model;
sampling on a CPU holds the model itself (the CPU is the device) plus about one slab of it
and what sampling needs: every path stays within 1.3x the model's bytes (the issue measured
3.9x, 2.0x, 3.0x and 1.7x before). The HF output of the round trip is bit-identical to the
input, and every peak is within what `--mode=plan` states for the model
(`gptj.plan.host_memory`).

The model is GPT-J-shaped (its layers hold 95% of its bytes, as GPT-J-6B's hold 93%) and
1.2 GiB, not smaller: compiling and running the sampler on XLA:CPU costs about 0.25 GiB
whatever the model (plus one layer, which the layer scan copies), and 0.3x of a 0.6 GiB
model would leave no room for it.
"""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import weights_memory  # noqa: E402
from gptj import plan  # noqa: E402
from gptj.model.transformer import GPTJConfig  # noqa: E402
from gptj.weights.formats import hf_files  # noqa: E402

# 24 layers of d_model 1024 and an 8192-token vocabulary: 319M parameters, 1.19 GiB in fp32. A short context
# keeps the sampler's KV cache (sized for the model's whole context) small beside the weights.
SHAPE = dict(n_embd=1024, n_layer=24, n_head=16, rotary_dim=32, vocab_size=8192, n_positions=512)


@pytest.mark.slow
def test_every_path_holds_at_most_1_3x_the_model(tmp_path):
    model_bytes = weights_memory.write_random_checkpoint(str(tmp_path / "hf"), SHAPE)
    assert model_bytes >= 2**30
    peaks = {}
    for path in ("from_hf", "to_hf", "quantize", "sample_hf", "sample_params"):  # sample_hf loads as load_hf does
        peaks[path] = weights_memory.measure(path, str(tmp_path), timeout=900)["peak"]
    ratios = {path: round(peak / model_bytes, 3) for path, peak in peaks.items()}
    print(f"peak / model bytes ({model_bytes / 2**30:.2f} GiB): {ratios}")  # seen with pytest -s
    assert all(ratio <= 1.3 for ratio in ratios.values()), ratios
    # Conversions hold blocks, not the model; and the formula --mode=plan states holds.
    assert ratios["from_hf"] < 0.6 and ratios["to_hf"] < 0.6 and ratios["quantize"] < 0.6, ratios
    host = plan.host_memory(GPTJConfig(vocab_size=SHAPE["vocab_size"], num_layers=SHAPE["n_layer"],
                                       d_model=SHAPE["n_embd"], num_heads=SHAPE["n_head"],
                                       rotary_dim=SHAPE["rotary_dim"], max_len=SHAPE["n_positions"]))
    assert peaks["from_hf"] <= host.convert and peaks["quantize"] <= host.convert, (peaks, host)
    assert peaks["to_hf"] <= host.to_hf, (peaks, host)

    source, back = hf_files.WeightFiles(str(tmp_path / "hf")), hf_files.WeightFiles(str(tmp_path / "out_to_hf"))
    assert sorted(source.tensors) == sorted(back.tensors)
    for name, tensor in source.tensors.items():
        box = tuple(slice(0, n) for n in tensor.shape)
        assert np.array_equal(source.read(name, box, np.float32), back.read(name, box, np.float32)), name


def test_plan_states_the_host_memory_of_gptj_6b():
    from gptj.configs import gptj_6b

    host = plan.host_memory(GPTJConfig.from_dict(gptj_6b.get_config().model.to_dict()))
    assert host.num_params == 6_050_882_784
    assert host.convert < 1.5 * 2**30 and host.to_hf < 2 * 2**30  # converting GPT-J-6B fits any machine
    assert host.load_accelerator < 2**30
    assert host.load_cpu["fp32"] - host.num_params * 4 == host.load_cpu["int8"] - host.num_params
    text = "\n".join(plan.format_host_memory(host))
    assert "convert from_hf, from_mtj, slim" in text and "23.1 / 11.8 / 6.2 GiB" in text, text
