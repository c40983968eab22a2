"""Random-weight HuggingFace GPT-J models for parity tests (torch, fp32, CPU)."""

import numpy as np
import torch
from transformers import GPTJConfig as HFGPTJConfig
from transformers import GPTJForCausalLM


def random_hf_model(vocab_size=101, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=64, seed=0):
    """A GPTJForCausalLM whose every weight, LayerNorms and biases included, is random.

    HF initialises biases to zero and LayerNorm scales to one; randomising them
    makes a parity test able to catch a dropped bias or a misplaced LayerNorm.
    """
    torch.manual_seed(seed)
    config = HFGPTJConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                          n_head=n_head, rotary_dim=rotary_dim, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPTJForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if name.endswith(("ln_1.weight", "ln_f.weight")) else 0.0
            p.copy_(centre + 0.2 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def assert_loads_as(path, model, tokens: np.ndarray) -> None:
    """`GPTJForCausalLM.from_pretrained(path)` loads every key (none missing, unexpected or misshapen), each
    tensor bit-identical to `model`'s, and gives the same logits on `tokens`."""
    loaded, info = GPTJForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    np.testing.assert_array_equal(hf_logits(loaded.eval(), tokens), hf_logits(model, tokens))
