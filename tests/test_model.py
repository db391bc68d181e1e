import math

import pytest
import torch

from model import ARCHS, GPT, GPTConfig, ReluSquared, cross_entropy, orthogonalize


def tiny(arch: str, **overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, arch=arch, **overrides)
    return GPT(config)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes(arch):
    model = tiny(arch)
    idx = torch.randint(0, 97, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 97) and loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 97) and loss is None
    out = model.generate(idx[:, :4], max_new_tokens=20, top_k=5)
    assert out.shape == (3, 24)
    assert torch.equal(out[:, :4], idx[:, :4])


@pytest.mark.parametrize("arch", ARCHS)
def test_causal(arch):
    """Changing a future token never changes the logits of earlier positions."""
    model = tiny(arch).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    logits, _ = model(idx, idx)
    logits_changed, _ = model(changed, changed)
    assert torch.allclose(logits[:, :10], logits_changed[:, :10], atol=1e-6)
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_loss_is_uniform_guess(arch):
    model = tiny(arch)
    idx, targets = torch.randint(0, 97, (8, 16)), torch.randint(0, 97, (8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(97)) < 0.15


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("muon_lr", [None, 0.02])
def test_overfits_one_batch(arch, muon_lr):
    model = tiny(arch)
    idx = torch.randint(0, 97, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu", muon_lr=muon_lr)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_tied_embeddings_only_in_gpt2():
    gpt2, modern = tiny("gpt2"), tiny("modern")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert modern.lm_head.weight is not modern.transformer.wte.weight


def test_weight_decay_only_on_matrices():
    model = tiny("gpt2", bias=True)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_params()


def test_flops_per_token_counts_matmul_weights():
    cfg = GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=1, n_embd=4, arch="gpt2")
    model = GPT(cfg)
    # per layer: attention 4*4*3 + 4*4, MLP 4*16*2, LayerNorm weights 2*4; final LayerNorm 4; tied token table 100*4
    weights = (48 + 16 + 128 + 8) + 4 + 400
    assert model.flops_per_token() == 6 * weights + 12 * 1 * 4 * 8


def test_cross_entropy_matches_pytorch_in_value_and_gradient():
    logits = torch.randn(64, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (64,))
    ours = cross_entropy(logits * 3, targets)  # scaled, so the gradient flowing in is not 1
    (grad_ours,) = torch.autograd.grad(ours, logits)
    reference = torch.nn.functional.cross_entropy(logits * 3, targets)
    (grad_reference,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(ours, reference) and torch.allclose(grad_ours, grad_reference)


def test_cross_entropy_backward_runs_once():
    """Its backward reuses the saved softmax in place, so a second one must fail rather than be wrong."""
    logits = torch.randn(8, 10, requires_grad=True)
    loss = cross_entropy(logits, torch.randint(0, 10, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(AttributeError):
        loss.backward()


def test_relu_squared_gradient():
    x = torch.randn(100, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReluSquared.apply, (x,))
    assert torch.equal(ReluSquared.apply(x), torch.relu(x) ** 2)


def test_orthogonalize_evens_out_singular_values():
    update = torch.randn(32, 96) * torch.logspace(-3, 1, 96)  # columns of very different sizes
    singular = torch.linalg.svdvals(orthogonalize(update))
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert orthogonalize(update.T).shape == (96, 32)


def test_muon_groups_cover_every_parameter_once():
    model = tiny("modern")
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    muon = [p for g in optimizer.param_groups if g["use_muon"] for p in g["params"]]
    adamw = [p for g in optimizer.param_groups if not g["use_muon"] for p in g["params"]]
    assert len(muon) == 4 * model.config.n_layer  # attention qkv and output, MLP in and out
    assert {id(model.transformer.wte.weight), id(model.lm_head.weight)} <= {id(p) for p in adamw}
    assert len({id(p) for p in muon + adamw}) == len(list(model.parameters()))
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.02, 1e-3]
