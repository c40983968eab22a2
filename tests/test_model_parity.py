"""gptj's GPT-J equals HuggingFace's PyTorch GPT-J on the same weights (DESIGN.md: "GPT-J, exactly")."""

import numpy as np
import pytest
from hf_utils import hf_logits, random_hf_model

from gptj.model.transformer import GPTJ
from gptj.weights.formats import hf

# One config with rotary_dim < head_dim, one with an odd layer count and full-width rotary.
HF_SHAPES = {
    "partial_rotary": dict(vocab_size=101, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "odd_layers_full_rotary": dict(vocab_size=96, n_embd=48, n_layer=3, n_head=3, rotary_dim=16),
}


@pytest.fixture(scope="module", params=sorted(HF_SHAPES))
def hf_model_dir(request, tmp_path_factory):
    model = random_hf_model(**HF_SHAPES[request.param], seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, str(path)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_hf(hf_model_dir, scan_layers):
    model, path = hf_model_dir
    params, config = hf.read_hf(path, vocab_pad_multiple=8)
    config = config.replace(scan_layers=scan_layers)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, size=(3, 11))
    ours = np.asarray(GPTJ(config).apply({"params": params}, tokens))
    theirs = hf_logits(model, tokens)
    assert ours.shape == (3, 11, config.padded_vocab_size)
    assert np.abs(ours[..., : config.vocab_size] - theirs).max() <= 1e-4
    # Padded vocabulary rows can never be predicted.
    assert (ours[..., config.vocab_size:] < -1e29).all()


def test_padding_mask_matches_hf_attention_mask(hf_model_dir):
    """Left-padded rows with per-row positions give the logits of the unpadded sequence."""
    import torch

    model, path = hf_model_dir
    params, config = hf.read_hf(path)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, size=(1, 7))
    padded = np.concatenate([np.zeros((1, 3), np.int64), tokens], axis=1)
    mask = np.arange(10)[None] >= 3
    positions = np.maximum(np.arange(10)[None] - 3, 0)
    ours = np.asarray(GPTJ(config).apply({"params": params}, padded, positions, mask))[:, 3:]
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
