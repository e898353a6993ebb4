"""mixers.py: each token mixer against transformers' module (fp32, padded rows), its recurrent definition,
packed rows = separate sequences, and generation with a carried state = the whole sequence at once."""
import pytest
import torch

import mixers


def short_conv_pair(bias, L=3, C=16, seed=0):
    """nanotune's ShortConv and transformers' Lfm2ShortConv with the same random weights."""
    from transformers import Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv
    cfg = Lfm2Config(hidden_size=C, conv_L_cache=L, conv_bias=bias, num_hidden_layers=1, layer_types=["conv"])
    torch.manual_seed(seed)
    hf = Lfm2ShortConv(cfg, 0).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    mine = mixers.ShortConv(C, L, bias)
    mine.load_state_dict(hf.state_dict())
    return mine, hf


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pad", ["left", "right"])
def test_short_conv_equals_transformers_and_its_recurrent_definition(bias, pad):
    mine, hf = short_conv_pair(bias)
    B, T = 3, 9
    x = torch.randn(B, T, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    if pad == "left":
        mask[1, :3] = 0
    else:
        mask[2, 6:] = 0
    with torch.no_grad():
        want = hf(x, attention_mask=mask)
        got = mine(x, mask)
    assert (got - want).abs().max() < 1e-5
    assert (mine.recurrent(x, mask) - got).abs().max() < 1e-5


def test_short_conv_packed_rows_equal_separate_sequences_and_state_carries_generation():
    mine, _ = short_conv_pair(True, L=4)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 5, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    docs = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = mine(torch.cat([a, b], 1), docs=docs)
        alone = torch.cat([mine(a), mine(b)], 1)
        assert (packed - alone).abs().max() < 1e-6
        whole = mine(b)
        state = {}
        steps = [mine(b[:, :3], state=state)] + [mine(b[:, t: t + 1], state=state) for t in range(3, 7)]
        assert (torch.cat(steps, 1) - whole).abs().max() < 1e-6
        assert not torch.equal(packed[:, 5:], mine(torch.cat([a, b], 1))[:, 5:])  # (without docs, taps cross)
