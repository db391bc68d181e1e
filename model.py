"""
The GPT: one config dataclass and a few small modules, top to bottom in the order data flows.

Design choices:
- nanoGPT's call shapes: `forward(idx, targets=None) -> (logits, loss)`, `generate`, `configure_optimizers`.
- Causal self-attention through `F.scaled_dot_product_attention` (flash or memory-efficient kernel where available).
- Two block flavours, chosen by `arch`:
  "modern" (default): rotary position embeddings, parameter-free RMSNorm, QK-norm, ReLU² MLP, untied input and
  output embeddings, no biases: what nanochat and modded-nanogpt use for small GPTs.
  "gpt2": learned positions, LayerNorm, GELU MLP, tied embeddings: the plain GPT-2 block, kept for comparison.
- q and k reach attention in the compute dtype: the rotary tables are cast to it, and QK-norm's output (fp32 under
  CUDA autocast) is cast back, so attention never runs on promoted fp32 inputs.
- On the CPU the loss has its own lean backward (`SoftmaxCrossEntropy`): the (tokens x vocab) logits are the
  largest tensor of a small model's step, and PyTorch's cross_entropy passes over them several times. ReLU² has
  one too, and QK-norm and rotary run on q and k together: fewer passes over memory, which a CPU step pays for.
  Elsewhere the plain ops run, which GPU kernels and torch.compile fuse better than an autograd Function.
- Residual projections start small (std scaled by 1/sqrt(2 * n_layer)), as in GPT-2.
- `configure_optimizers` gives AdamW, or Muon (orthogonalized momentum) for the hidden matrices with AdamW for
  the rest, which reaches a lower loss in the same number of steps for small GPTs. Muon works as nanochat and
  modded-nanogpt do: the matrices of one shape (q, k and v as three) are stacked and orthogonalized together by
  one batched Newton–Schulz iteration, in bf16 on CUDA, compiled there, so a step dispatches about a hundred ops
  instead of dozens per matrix. On CUDA, fp32 matmuls may use TF32 (`enable_tf32`).
- `flops_per_token` gives the training FLOPs estimate (6N + attention) used for MFU.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("modern", "gpt2")


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    arch: str = "modern"

    @property
    def modern(self) -> bool:
        return self.arch == "modern"


class Norm(nn.Module):
    """Parameter-free RMSNorm (modern) or LayerNorm with optional bias (gpt2)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.rms = config.modern
        if not self.rms:
            self.weight = nn.Parameter(torch.ones(config.n_embd))
            self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (x.size(-1),))
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rotary_tables(block_size: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (block_size, 1, 1, head_dim // 2): they broadcast over (B, T, q|k, head, channels)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)[:, None, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        if rotary is None:
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        else:
            # QK-norm, then rotary, on q and k at once and in (B, T) order: one pass each over contiguous memory.
            # The order does not matter in exact arithmetic: a rotation keeps each head vector's norm.
            # Tables and result in qkv's dtype: CUDA autocast runs rms_norm in fp32, attention wants bf16.
            cos, sin = (table.to(qkv.dtype) for table in rotary)
            qk = apply_rotary(F.rms_norm(qkv[:, :, :2], (qkv.size(-1),)), cos, sin).to(qkv.dtype)
            q, k = qk.unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, qkv[:, :, 2]))  # (B, n_head, T, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ReluSquared(torch.autograd.Function):
    """relu(x)², with a backward of one product: 2 relu(x) is zero wherever relu's own gradient is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        relu = F.relu(x)
        ctx.save_for_backward(relu)
        return relu * relu

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (relu,) = ctx.saved_tensors
        return (grad * relu).mul_(2)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.relu_squared = config.modern
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        if not self.relu_squared:
            x = F.gelu(x)
        elif x.device.type == "cpu":
            x = ReluSquared.apply(x)
        else:
            x = F.relu(x).square()
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary)
        return x + self.mlp(self.ln_2(x))


class SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), with a backward of one pass over the logits.

    On the CPU, F.cross_entropy passes over the (N, V) logits, the largest tensor of a small model's step, several
    times: log_softmax, then a zero-filled gradient for nll_loss, a scatter, and log_softmax's backward with its
    exp. Here the forward keeps the softmax, and the backward turns it into the gradient in place: softmax minus one
    at each target (bench/bench_train_step.py measures the difference). The loss is read from the target's
    probability, so it saturates at -log(smallest float), about 87 nats, far above any loss a run survives.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        ctx.probs, ctx.targets = probs, targets  # on ctx, not saved for backward: backward reuses probs in place
        target_probs = probs.gather(1, targets[:, None]).clamp_min(torch.finfo(probs.dtype).tiny)
        return -target_probs.log().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, targets = ctx.probs, ctx.targets
        del ctx.probs  # a second backward through the same graph fails loudly instead of reading a gradient
        probs.scatter_add_(1, targets[:, None], probs.new_full((len(targets), 1), -1.0))
        return probs.mul_(grad / len(targets)), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if logits.device.type == "cpu":
        return SoftmaxCrossEntropy.apply(logits, targets)
    return F.cross_entropy(logits, targets)  # fused kernels on GPUs


def enable_tf32() -> None:
    """Let fp32 matrix multiplies on CUDA use TF32 tensor cores (process-wide), as nanoGPT's train.py does."""
    torch.set_float32_matmul_precision("high")


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Push the singular values of a matrix, or of each matrix of a stack (..., rows, cols), towards 1 with a
    quintic Newton–Schulz iteration (as in modded-nanogpt), computed in `dtype`.

    The coefficients trade exactness for speed: singular values land roughly in [0.7, 1.2], which is enough.
    Each iteration is three batched matmuls however many matrices are stacked.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.reshape(-1, *update.shape[-2:]).to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide orientation, whose Gram matrix is the smaller one
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G²) x
    if tall:
        x = x.mT
    return x.reshape(update.shape)


def muon_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffer: torch.Tensor,
    lr: torch.Tensor,
    momentum: float,
    ns_dtype: torch.dtype,
) -> None:
    """One Muon step for the matrices of one shape: Nesterov momentum, one batched orthogonalization, the update.

    `momentum_buffer` is (matrices, rows, cols); each of `params` holds one or more of those matrices stacked along
    its rows (attention's q, k and v are three). `lr` is a tensor so that torch.compile does not recompile when the
    schedule changes it.
    """
    rows, cols = momentum_buffer.shape[1:]
    grad = torch.cat([g.view(-1, rows, cols) for g in grads])
    momentum_buffer.mul_(momentum).add_(grad)
    update = orthogonalize(grad.add(momentum_buffer, alpha=momentum), dtype=ns_dtype).to(grad.dtype)
    # Tall matrices scaled by sqrt(rows / cols), so their update's RMS matches a square matrix's.
    update.mul_(lr * max(1.0, rows / cols) ** 0.5)
    counts = [p.numel() // (rows * cols) for p in params]
    torch._foreach_sub_([p.view(-1, rows, cols) for p in params], list(update.split(counts)))


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon`, AdamW for the others, in one optimizer (one state dict, one step).

    Muon: Nesterov momentum, then the update matrix is orthogonalized, so every direction of a weight matrix
    moves by about the same amount. A Muon group holds the matrices of one `matrix_shape`, updated together by
    `muon_update`; its momentum is one stacked buffer, created at the first step and kept in the state of the
    group's first parameter. Embeddings, the output head and vectors keep AdamW, where orthogonal updates do not
    fit, as a few foreach ops per group. `compile_backend` (e.g. "inductor") compiles the Muon update.
    """

    def __init__(
        self,
        groups: list[dict],
        betas: tuple[float, float],
        momentum: float = 0.95,
        eps: float = 1e-8,
        compile_backend: str | None = None,
    ):
        super().__init__(groups, dict(betas=betas, momentum=momentum, eps=eps, weight_decay=0.0))
        self.lr_tensors = [torch.tensor(0.0) for _ in self.param_groups]  # one per group, read by the update
        self.muon_update = muon_update
        if compile_backend is not None:
            self.muon_update = torch.compile(muon_update, backend=compile_backend, fullgraph=True, dynamic=False)

    @torch.no_grad()
    def step(self, closure=None):
        for group, lr_tensor in zip(self.param_groups, self.lr_tensors, strict=True):
            if group["use_muon"]:
                self._muon_step(group, lr_tensor)
            else:
                self._adamw_step(group)

    def _muon_step(self, group: dict, lr_tensor: torch.Tensor) -> None:
        params = group["params"]
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return
        state = self.state[params[0]]
        if "momentum_buffer" not in state:
            rows, cols = group["matrix_shape"]
            count = sum(p.numel() for p in params) // (rows * cols)
            state["momentum_buffer"] = params[0].new_zeros(count, rows, cols)
        ns_dtype = torch.bfloat16 if params[0].device.type == "cuda" else torch.float32
        lr_tensor.fill_(group["lr"])
        self.muon_update(params, grads, state["momentum_buffer"], lr_tensor, group["momentum"], ns_dtype)

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        (beta1, beta2), lr = group["betas"], group["lr"]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1 - beta2 ** s["step"]) ** 0.5 for s in states])
        torch._foreach_add_(denominators, group["eps"])
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(params, exp_avgs, denominators, [-lr / (1 - beta1 ** s["step"]) for s in states])


def muon_matrix_shape(name: str, p: torch.Tensor) -> tuple[int, int]:
    """The shape of the matrices Muon orthogonalizes in a hidden weight: attention's c_attn is q, k and v."""
    rows, cols = p.shape
    return (rows // 3, cols) if name.endswith("attn.c_attn.weight") else (rows, cols)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.arch in ARCHS, f"arch must be one of {ARCHS}"
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=Norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.modern:
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        else:
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
            self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence of {T} tokens is longer than block_size"
        x = self.transformer.wte(idx)
        rotary = None
        if self.config.modern:
            rotary = (self.rotary_cos[:T], self.rotary_sin[:T])
        else:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rotary)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # only the last position is needed to sample
        logits = self.lm_head(x)
        loss = cross_entropy(logits.float(), targets)
        return logits, loss

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
        muon_lr: float | None = None,
        compile_muon: bool | None = None,
    ) -> torch.optim.Optimizer:
        """AdamW, with weight decay on matrices only; or, given `muon_lr`, Muon for the hidden matrices.

        Every group records its peak rate as `initial_lr`, so a schedule scales all groups alike. Muon has one
        group per matrix shape. On CUDA: TF32 for fp32 matmuls (`enable_tf32`), fused AdamW, and Muon's update
        compiled unless `compile_muon` is False (it is compiled only on CUDA by default).
        """
        if device_type == "cuda":
            enable_tf32()
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if muon_lr is None:
            groups = [
                {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
            ]
            extra = {"fused": True} if device_type == "cuda" else {"foreach": True}
            optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
        else:
            by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
            for name, p in params.items():
                if p.dim() == 2 and name.startswith("transformer.h."):
                    by_shape.setdefault(muon_matrix_shape(name, p), []).append(p)
            hidden = {id(p) for group in by_shape.values() for p in group}
            tables = [p for p in params.values() if p.dim() == 2 and id(p) not in hidden]
            vectors = [p for p in params.values() if p.dim() < 2]
            groups = [
                {"params": group, "use_muon": True, "lr": muon_lr, "matrix_shape": shape}
                for shape, group in by_shape.items()
            ]
            groups += [
                {"params": tables, "use_muon": False, "lr": learning_rate, "weight_decay": weight_decay},
                {"params": vectors, "use_muon": False, "lr": learning_rate, "weight_decay": 0.0},
            ]
            compile_muon = device_type == "cuda" if compile_muon is None else compile_muon
            backend = "inductor" if compile_muon else None
            optimizer = Muon([g for g in groups if g["params"]], betas=betas, compile_backend=backend)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores and values."""
        cfg = self.config
        # Embedding lookups are not matmuls: drop the position table, and the token table unless it is tied.
        lookups = self.transformer.wte if cfg.modern else self.transformer.wpe
        n_weights = self.num_params() - lookups.weight.numel()
        return 6 * n_weights + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def training_memory(self, batch_size: int) -> int:
        """A rough lower bound of the bytes one training step holds: weights, gradients and two optimizer states
        in fp32, the activations kept for backward (about 16 values per channel per layer), and the logits three
        times over (logits, probabilities, their gradient)."""
        cfg = self.config
        tokens = batch_size * cfg.block_size
        activations = tokens * (16 * cfg.n_layer * cfg.n_embd + 3 * cfg.vocab_size)
        return 4 * (4 * self.num_params() + activations)

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after the prompt `idx` (B, T); temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
