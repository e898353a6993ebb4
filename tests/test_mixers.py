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


def deltanet_pair(seed=0, Hk=2, Hv=4, dk=8, dv=6, C=32, chunk=8):
    """nanotune's GatedDeltaNet and transformers' Qwen3_5GatedDeltaNet with the same random weights (non-trivial
    decays, steps and norm)."""
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
    cfg = Qwen3_5TextConfig(hidden_size=C, linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=dk,
                            linear_value_head_dim=dv, linear_conv_kernel_dim=4, num_hidden_layers=1,
                            layer_types=["linear_attention"], rms_norm_eps=1e-6)
    return twin(Qwen3_5GatedDeltaNet(cfg, 0), mixers.GatedDeltaNet(C, Hk, Hv, dk, dv, 4, 1e-6, chunk), seed)


def twin(hf, mine, seed):
    """(mine, hf) holding the same random weights: projections and conv ~ N(0, 0.3), decays / steps / skips in
    [-1, 1], the norm's weight in [0.5, 1.5]."""
    torch.manual_seed(seed)
    hf = hf.float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(0, 0.3) if "proj" in n or "conv" in n else p.uniform_(-1, 1) if n != "norm.weight" else \
                p.uniform_(0.5, 1.5)
    mine.load_state_dict(hf.state_dict())
    return mine, hf


@pytest.mark.parametrize("pad", ["left", "right"])
def test_gated_deltanet_equals_transformers_and_its_recurrent_definition(pad):
    """Qwen3.5's linear attention on a padded batch (21 tokens: chunks of 8 and a partial one): nanotune's chunked
    form = transformers' Qwen3_5GatedDeltaNet (its own chunked torch path) = the token-by-token definition."""
    equals_transformers_and_recurrent(*deltanet_pair(), 32, pad)


def equals_transformers_and_recurrent(mine, hf, C, pad):
    """mine(h, mask) = transformers' module = mine.recurrent on 2 rows of 21 tokens, one padded left or right (5),
    within 1e-5 of the largest output over the real tokens."""
    h = torch.randn(2, 21, C)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :5] = 0 if pad == "left" else 1
    mask[1, -5:] = 0 if pad == "right" else 1
    with torch.no_grad():
        want = hf(h, attention_mask=mask)
        got = mine(h, mask)
    real = mask.bool()
    assert (got - want)[real].abs().max() < 1e-5 * want.abs().max()
    assert (mine.recurrent(h, mask) - got)[real].abs().max() < 1e-5 * want.abs().max()
    assert want.abs().max() > 0.1


@pytest.mark.parametrize("T,chunk", [(37, 16), (16, 16), (5, 8), (50, 7)])
def test_chunked_delta_rule_equals_the_recurrent_definition_in_values_and_gradients(T, chunk):
    """fp64: chunked = recurrent (values, final state, every gradient) with documents starting inside and at chunk
    boundaries and an incoming state; bf16 inputs: within 2e-2 of the fp64 truth (relative to its largest value)."""
    torch.manual_seed(T)
    B, H, dk, dv = 2, 3, 8, 6
    q, k = torch.randn(B, T, H, dk, dtype=torch.float64), torch.randn(B, T, H, dk, dtype=torch.float64)
    k = k / k.norm(dim=-1, keepdim=True)
    v, g = torch.randn(B, T, H, dv, dtype=torch.float64), -torch.rand(B, T, H, dtype=torch.float64)
    beta, S0 = torch.rand(B, T, H, dtype=torch.float64), torch.randn(B, H, dk, dv, dtype=torch.float64) * 0.1
    chunked_equals_recurrent(mixers.delta_rule_recurrent, mixers.delta_rule_chunked, [q, k, v, g, beta], S0, T, chunk)


def chunked_equals_recurrent(recurrent, chunked, inputs, S0, T, chunk):
    """fp64: chunked(inputs, starts, S0) = recurrent(...) in the output, the final state and every gradient (inputs
    and S0), documents starting inside a chunk and on a chunk boundary; bf16 inputs: within 2e-2 of fp64."""
    B = inputs[0].shape[0]
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, T // 3], starts[1, min(chunk, T - 1)], starts[1, T - 1] = True, True, True
    leaves = [t.requires_grad_() for t in (*inputs, S0)]
    outs = [f(*inputs, starts, S0, **kw) for f, kw in ((recurrent, {}), (chunked, {"chunk": chunk}))]
    w = torch.randn_like(outs[0][0]), torch.randn_like(outs[0][1])
    grads = [torch.autograd.grad((o * w[0]).sum() + (S * w[1]).sum(), leaves) for o, S in outs]
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-12 and (outs[0][1] - outs[1][1]).abs().max() < 1e-12
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-11 * max(1.0, a.abs().max())
    low = [t.detach().bfloat16() for t in inputs]
    o16, _ = chunked(*low, starts, S0.detach().float(), chunk=chunk)
    truth, _ = recurrent(*[t.double() for t in low], starts, S0.detach())
    assert (o16.double() - truth).abs().max() < 2e-2 * truth.abs().max()


def test_gated_deltanet_packed_rows_equal_separate_sequences_and_state_carries_generation():
    """Two documents packed in one row = each alone (the state and the conv taps reset at the start); a sequence fed
    in two parts with the state carried (conv window and S) = the whole sequence at once."""
    packed_and_carried(deltanet_pair(seed=1)[0], 32)


def packed_and_carried(mine, C):
    """Documents of 13 and 9 tokens packed in one row = each alone (and differ from the row without documents); 13
    tokens fed as 6 + 1 + 6 with the state carried = all at once."""
    a, b = torch.randn(1, 13, C), torch.randn(1, 9, C)
    docs = torch.tensor([[0] * 13 + [1] * 9])
    with torch.no_grad():
        packed = mine(torch.cat([a, b], 1), docs=docs)
        sep = torch.cat([mine(a), mine(b)], 1)
        assert (packed - sep).abs().max() < 1e-5
        assert (packed - mine(torch.cat([a, b], 1)))[:, 13:].abs().max() > 1e-3  # (without docs, b sees a)
        whole, state = mine(a), {}
        parts = torch.cat([mine(a[:, :6], state=state), mine(a[:, 6:7], state=state), mine(a[:, 7:], state=state)], 1)
    assert (parts - whole).abs().max() < 1e-5 and set(state) == {"conv", "ssm"}


def mamba2_pair(seed=0, nh=4, P=8, G=2, N=5, C=16, chunk=8, bias=False, limit=(0.0, float("inf"))):
    """nanotune's Mamba2 and transformers' GraniteMoeHybridMambaLayer (its torch path) with the same random weights
    (non-trivial decays, skips, conv and norm)."""
    from transformers import GraniteMoeHybridConfig
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer
    cfg = GraniteMoeHybridConfig(hidden_size=C, mamba_n_heads=nh, mamba_d_head=P, mamba_n_groups=G, mamba_d_state=N,
                                 mamba_expand=nh * P // C, mamba_chunk_size=chunk, mamba_proj_bias=bias,
                                 mamba_conv_bias=True, num_hidden_layers=1, layer_types=["linear_attention"],
                                 time_step_limit=limit, rms_norm_eps=1e-6)
    return twin(GraniteMoeHybridMambaLayer(cfg, 0), mixers.Mamba2(C, nh, P, G, N, 4, True, bias, 1e-6, limit, chunk),
                seed)


@pytest.mark.parametrize("pad,bias,limit", [("left", False, (0.0, float("inf"))), ("right", True, (0.3, 1.2))])
def test_mamba2_equals_transformers_and_its_recurrent_definition(pad, bias, limit):
    """Granite 4.0-H's Mamba2 layer on a padded batch (21 tokens: chunks of 8 and a partial one; projection biases
    and a time-step clamp in one case): nanotune's chunked form = transformers' torch path = the token-by-token
    definition."""
    equals_transformers_and_recurrent(*mamba2_pair(bias=bias, limit=limit), 16, pad)


@pytest.mark.parametrize("T,chunk", [(37, 16), (16, 16), (5, 8), (50, 7)])
def test_chunked_ssd_equals_the_recurrent_definition_in_values_and_gradients(T, chunk):
    """fp64: Mamba2's chunked scan = recurrent (values, final state, every gradient) with documents starting inside
    and at chunk boundaries and an incoming state; bf16 inputs: within 2e-2 of the fp64 truth."""
    torch.manual_seed(T)
    B, H, P, N = 2, 3, 4, 5
    x, dt = torch.randn(B, T, H, P, dtype=torch.float64), torch.rand(B, T, H, dtype=torch.float64) + 0.05
    A = -torch.rand(H, dtype=torch.float64) - 0.1
    Bm, Cm = torch.randn(B, T, H, N, dtype=torch.float64), torch.randn(B, T, H, N, dtype=torch.float64)
    S0 = torch.randn(B, H, P, N, dtype=torch.float64) * 0.1
    chunked_equals_recurrent(mixers.ssd_recurrent, mixers.ssd_chunked, [x, dt, A, Bm, Cm], S0, T, chunk)


def test_mamba2_packed_rows_equal_separate_sequences_and_state_carries_generation():
    """Two documents packed in one row = each alone; a sequence fed in parts with the state carried (conv window and
    h) = the whole sequence at once."""
    packed_and_carried(mamba2_pair(seed=1)[0], 16)
