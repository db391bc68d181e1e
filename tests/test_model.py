import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from model import ARCHS, GPT, GPTConfig, ReluSquared, cross_entropy, muon_update, orthogonalize

# Tests taking `device` run on the CPU always, and on CUDA too where there is one (bench/gpu.sh selects those).
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def tiny(arch: str, **overrides) -> GPT:
    torch.manual_seed(0)
    shape = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32) | overrides
    config = GPTConfig(arch=arch, **shape)
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


@pytest.mark.parametrize("device", DEVICES)
def test_orthogonalize_evens_out_singular_values(device):
    update = torch.randn(32, 96, device=device) * torch.logspace(-3, 1, 96, device=device)  # very unequal columns
    singular = torch.linalg.svdvals(orthogonalize(update).float())
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert orthogonalize(update.T).shape == (96, 32)
    stacked = torch.stack([update, update * 100, update.flip(1)])
    for singular in torch.linalg.svdvals(orthogonalize(stacked, dtype=torch.bfloat16).float()):
        assert singular.min() > 0.5 and singular.max() < 1.3  # each matrix of a stack on its own, in bf16 too


def hidden_matrices(model: GPT) -> dict[str, torch.Tensor]:
    """Every matrix Muon should orthogonalize on its own, as views: attention's c_attn is q, k and v."""
    matrices = {}
    for name, p in model.named_parameters():
        if name.endswith("c_attn.weight"):
            for part, block in zip("qkv", p.detach().chunk(3), strict=True):
                matrices[f"{name}.{part}"] = block
        elif p.dim() == 2 and name.startswith("transformer.h."):
            matrices[name] = p.detach()
    return matrices


def test_muon_groups_cover_every_parameter_once():
    model = tiny("modern")
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    muon = [p for g in optimizer.param_groups if g["use_muon"] for p in g["params"]]
    adamw = [p for g in optimizer.param_groups if not g["use_muon"] for p in g["params"]]
    assert len(muon) == 4 * model.config.n_layer  # attention qkv and output, MLP in and out
    assert {id(model.transformer.wte.weight), id(model.lm_head.weight)} <= {id(p) for p in adamw}
    assert len({id(p) for p in muon + adamw}) == len(list(model.parameters()))
    c = model.config.n_embd
    shapes = [g["matrix_shape"] for g in optimizer.param_groups if g["use_muon"]]
    assert sorted(shapes) == [(c, c), (c, 4 * c), (4 * c, c)]  # q, k, v and the output projection are (c, c)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.02] * 3 + [1e-3]


def conditioned(rows: int, cols: int, scale: float) -> torch.Tensor:
    """A random matrix whose singular values span one decade: five Newton–Schulz steps flatten those."""
    u, v = torch.linalg.qr(torch.randn(rows, rows))[0], torch.linalg.qr(torch.randn(cols, cols))[0]
    k = min(rows, cols)
    return scale * u[:, :k] @ torch.diag(torch.logspace(0, -1, k)) @ v[:, :k].T


@pytest.mark.parametrize("device", DEVICES)
def test_muon_orthogonalizes_every_hidden_matrix_on_its_own(device):
    """One step from rest moves each matrix (q, k and v each) by lr times an orthogonal matrix, whatever the
    gradients' scales: orthogonalizing c_attn whole would leave the blocks with small gradients nearly still."""
    model = tiny("modern").to(device)
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), device, muon_lr=0.02)
    for name, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        if name.endswith("c_attn.weight"):
            c = p.size(1)
            p.grad = torch.cat([conditioned(c, c, scale) for scale in (1e-3, 1.0, 1e3)]).to(device)
        elif name in hidden_matrices(model):
            p.grad = conditioned(*p.shape, 1.0).to(device)
    before = {name: m.clone() for name, m in hidden_matrices(model).items()}
    optimizer.step()
    after = hidden_matrices(model)
    assert len(after) == 6 * model.config.n_layer
    for name, matrix in after.items():
        rows, cols = matrix.shape
        expected = 0.02 * max(1.0, rows / cols) ** 0.5  # the rate, scaled up for tall matrices
        singular = torch.linalg.svdvals((before[name] - matrix).float()) / expected
        assert singular.min() > 0.5 and singular.max() < 1.3, name


def training_steps(model: GPT, optimizer: torch.optim.Optimizer, steps: int, device: str = "cpu") -> None:
    idx = torch.randint(0, model.config.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1)).to(device)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / steps)  # a schedule, as main.py's
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_compiled_muon_step_matches_eager_and_compiles_once_per_shape():
    compiled_graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting_backend(graph, example_inputs):
        compiled_graphs.append(graph)
        return aot_eager(graph, example_inputs)

    eager, compiled = tiny("modern"), tiny("modern")
    eager_optimizer = eager.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    compiled_optimizer = compiled.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    compiled_optimizer.muon_update = torch.compile(muon_update, backend=counting_backend, fullgraph=True)
    torch._dynamo.reset()
    training_steps(eager, eager_optimizer, 3)
    training_steps(compiled, compiled_optimizer, 3)
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert len(compiled_graphs) == 3  # one per matrix shape: a new learning rate each step recompiles nothing


@pytest.mark.parametrize("device", DEVICES)
def test_q_and_k_reach_attention_in_bf16_under_autocast(device):
    class RecordAttentionDtypes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                self.dtypes.append(tuple(t.dtype for t in args[:3]))
            return func(*args, **(kwargs or {}))

    model = tiny("modern").to(device)
    idx = torch.randint(0, 97, (2, 16), device=device)
    with RecordAttentionDtypes() as record, torch.autocast(device, torch.bfloat16):
        _, loss = model(idx, idx)
    assert record.dtypes == [(torch.bfloat16,) * 3] * model.config.n_layer
    assert math.isfinite(loss.item())


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def muon_step_ops(n_layer: int) -> int:
    """Ops dispatched by one Muon step, once its state exists."""
    model = tiny("modern", n_layer=n_layer)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    with CountOps() as ops:
        optimizer.step()
    return ops.count


def test_muon_step_dispatches_few_ops():
    """Matrices of one shape are orthogonalized together: a layer adds a few views, not a Newton–Schulz each.
    (A loop over matrices dispatches about 55 ops per matrix: 220 per layer, over 400 at 2 layers.)"""
    two, four = muon_step_ops(2), muon_step_ops(4)
    assert two < 150
    assert (four - two) / 2 <= 4 * 3  # per layer: 4 weights, a view of each and of its gradient


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_state_round_trip(device):
    """Save the optimizer, load it into a fresh one: the next steps are identical."""
    model = tiny("modern").to(device)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device, muon_lr=0.02)
    training_steps(model, optimizer, 2, device)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny("modern").to(device)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = resumed.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device, muon_lr=0.02)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    training_steps(model, optimizer, 2, device)
    training_steps(resumed, resumed_optimizer, 2, device)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
