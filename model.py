"""
The GPT: one config dataclass and a few small modules, top to bottom in the order data flows.

Design choices:
- nanoGPT's call shapes, with one change: `forward(idx)` gives the last position's logits (for sampling) and no
  loss; `forward(idx, targets)` gives no logits and the mean loss, or with `reduction="none"` the (B, T) loss of
  every token, so training never hands back the (B, T, vocab) logits and evaluation computes the loss once.
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
  Elsewhere, and under torch.compile, the plain ops run, which GPU kernels and torch.compile fuse better than an
  autograd Function (whose backward, reusing the softmax in place, dynamo could not trace as one graph anyway).
- Residual projections start small (std scaled by 1/sqrt(2 * n_layer)), as in GPT-2.
- The techniques of the modded-nanogpt speedrun and nanochat are GPTConfig fields, so each is a hypothesis one flag
  switches: zero-initialised output projections and head, RMSNorm after the embedding, an x0 mix into every block's
  input, value embeddings mixed into v, U-net skips, logit soft-capping; and per-role learning rates in
  `configure_optimizers`. Three are on by default with `arch="modern"` (ARCH_DEFAULTS: together they lowered the
  CPU recipe's held-out loss beyond its seed noise at no cost per step, BENCHMARKS.md section 9); the rest are off,
  and `arch="gpt2"` has none. With all of them off the model, its initial weights and its optimizer are exactly
  the plain ones: a technique's parameters are made after every plain one, so the random draws of the plain
  weights do not move.
- `configure_optimizers` gives AdamW, or Muon (orthogonalized momentum) for the hidden matrices with AdamW for
  the rest, which reaches a lower loss in the same number of steps for small GPTs. Muon works as nanochat and
  modded-nanogpt do: the matrices of one shape (q, k and v as three) are stacked and orthogonalized together by
  one batched Newton–Schulz iteration, in bf16 on CUDA, compiled there, so a step dispatches about a hundred ops
  instead of dozens per matrix. Its AdamW part is one fused kernel per group on CUDA (`torch._fused_adamw_`), a few
  foreach ops elsewhere. On CUDA, fp32 matmuls may use TF32 (`enable_tf32`).
- `flops_per_token` gives the training FLOPs estimate (6N + attention) used for MFU; `training_memory` the bytes
  a training step holds, for the check before training.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UsageError

ARCHS = ("modern", "gpt2")
# The techniques an arch turns on when their field is left None (see the design notes).
ARCH_DEFAULTS = {"modern": {"zero_init_proj": True, "embed_norm": True, "x0_mix": True}, "gpt2": {}}


def arch_default(arch: str, technique: str) -> bool:
    return ARCH_DEFAULTS.get(arch, {}).get(technique, False)


@dataclass
class GPTConfig:
    """The model's shape and its optional techniques. A technique's field is named as its flag is."""

    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    arch: str = "modern"
    zero_init_proj: bool | None = None  # attention and MLP output projections start at zero: blocks start as identity
    zero_init_head: bool = False  # the output head starts at zero: the first prediction is uniform
    embed_norm: bool | None = None  # RMSNorm on the embedding, before the first block
    x0_mix: bool | None = None  # each block's input is a learned mix of the residual stream and the embedding
    value_embeds: int = 0  # tables whose lookups are mixed into v of the first and of the last that many layers
    unet_skips: bool = False  # learned skips from the first half's block inputs to the mirrored later blocks
    logit_softcap: float = 0.0  # logits squashed to cap * tanh(logits / cap); 0 is off

    def __post_init__(self):
        for technique in ARCH_DEFAULTS["modern"]:  # None: as the arch has it
            if getattr(self, technique) is None:
                setattr(self, technique, arch_default(self.arch, technique))
        if self.zero_init_head and self.arch == "gpt2":
            raise UsageError("--zero_init_head needs an untied head: --arch gpt2 ties it to the token embedding")
        if not 0 <= 2 * self.value_embeds <= self.n_layer:
            raise UsageError(
                f"--value_embeds {self.value_embeds} feeds the first and the last {self.value_embeds} layers: "
                f"it needs --n_layer {2 * self.value_embeds} or more"
            )
        if self.unet_skips and self.n_layer < 2:
            raise UsageError("--unet_skips joins early blocks to late ones: it needs --n_layer 2 or more")
        if self.logit_softcap < 0:
            raise UsageError(f"--logit_softcap {self.logit_softcap} must be 0 (off) or positive")

    @property
    def modern(self) -> bool:
        return self.arch == "modern"

    def value_table(self, layer: int) -> int | None:
        """The value-embedding table of a layer: table j feeds layer j and layer n_layer - value_embeds + j (the
        speedrun's 012...012 pattern), the middle layers none."""
        if layer < self.value_embeds:
            return layer
        if layer >= self.n_layer - self.value_embeds:
            return layer - (self.n_layer - self.value_embeds)
        return None


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
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.value_table(layer) is not None:
            self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5]))  # v and the value embedding, half each at first

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, value_embed: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        v = qkv[:, :, 2]
        if value_embed is not None:  # in v's dtype: under autocast the lookup is fp32, v and attention bf16
            v = self.value_mix[0] * v + self.value_mix[1] * value_embed.view_as(v).to(v.dtype)
        if rotary is None:
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        else:
            # QK-norm, then rotary, on q and k at once and in (B, T) order: one pass each over contiguous memory.
            # The order does not matter in exact arithmetic: a rotation keeps each head vector's norm.
            # Tables and result in qkv's dtype: CUDA autocast runs rms_norm in fp32, attention wants bf16.
            cos, sin = (table.to(qkv.dtype) for table in rotary)
            qk = apply_rotary(F.rms_norm(qkv[:, :, :2], (qkv.size(-1),)), cos, sin).to(qkv.dtype)
            q, k = qk.unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n_head, T, head_dim)
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
        elif x.device.type == "cpu" and not torch.compiler.is_compiling():
            x = ReluSquared.apply(x)
        else:
            x = F.relu(x).square()
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, value_embed: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, value_embed)
        return x + self.mlp(self.ln_2(x))


class SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), optionally soft-capped, with a backward of one
    pass over the logits (two with the cap).

    On the CPU, F.cross_entropy passes over the (N, V) logits, the largest tensor of a small model's step, several
    times: log_softmax, then a zero-filled gradient for nll_loss, a scatter, and log_softmax's backward with its
    exp. Here the forward keeps the softmax, and the backward turns it into the gradient in place: softmax minus one
    at each target (bench/bench_train_step.py measures the difference). The loss is read from the target's
    probability, so it saturates at -log(smallest float), about 87 nats, far above any loss a run survives.

    The cap: cap * tanh(l / cap) equals 2 cap * sigmoid(2 l / cap) - cap, and a softmax ignores the shift, so the
    capped logits are 2 cap * sigmoid(2 l / cap): one new tensor, and a sigmoid, which is about ten times cheaper
    than tanh on the CPU (bench/bench_technique_step.py measures the step).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
        if softcap:
            logits = logits.mul(2 / softcap).sigmoid_().mul_(2 * softcap)
        probs = torch.softmax(logits, dim=-1)
        # On ctx, not saved for backward: backward reuses them in place.
        ctx.probs, ctx.targets, ctx.capped, ctx.softcap = probs, targets, logits, softcap
        target_probs = probs.gather(1, targets[:, None]).clamp_min(torch.finfo(probs.dtype).tiny)
        return -target_probs.log().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, targets, capped, cap = ctx.probs, ctx.targets, ctx.capped, ctx.softcap
        del ctx.probs, ctx.capped  # a second backward through the same graph fails loudly instead of reading junk
        probs.scatter_add_(1, targets[:, None], probs.new_full((len(targets), 1), -1.0))
        if not cap:
            return probs.mul_(grad / len(targets)), None, None
        # The cap's slope, 4 sigmoid (1 - sigmoid), is (2 / cap) c (1 - c / (2 cap)) of the capped logits c.
        slope = capped.addcmul_(capped, capped, value=-0.5 / cap)
        return probs.mul_(grad * (2 / cap) / len(targets)).mul_(slope), None, None


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Logits squashed smoothly into (-cap, cap); a cap of 0 leaves them as they are."""
    return cap * torch.tanh(logits / cap) if cap else logits


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", logit_softcap: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of logits (..., V), soft-capped by `logit_softcap` (0: not), against targets (...): their mean,
    or with reduction "none" each one's, in the targets' shape."""
    assert reduction in ("mean", "none"), f"reduction must be 'mean' or 'none', not {reduction!r}"
    flat_logits, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if reduction == "mean" and logits.device.type == "cpu" and not torch.compiler.is_compiling():
        return SoftmaxCrossEntropy.apply(flat_logits, flat_targets, logit_softcap)
    # Fused kernels on GPUs and under torch.compile; and evaluation, which needs no backward, gets PyTorch's exact
    # log-softmax.
    losses = F.cross_entropy(softcap(flat_logits, logit_softcap), flat_targets, reduction=reduction)
    return losses.view_as(targets) if reduction == "none" else losses


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
    fit: one fused kernel per group with `fused_adamw` (on CUDA), else a few foreach ops per group.
    `compile_backend` (e.g. "inductor") compiles the Muon update.
    """

    def __init__(
        self,
        groups: list[dict],
        betas: tuple[float, float],
        momentum: float = 0.95,
        eps: float = 1e-8,
        compile_backend: str | None = None,
        fused_adamw: bool = False,
    ):
        super().__init__(groups, dict(betas=betas, momentum=momentum, eps=eps, weight_decay=0.0))
        self.lr_tensors = [torch.tensor(0.0) for _ in self.param_groups]  # one per group, read by the update
        self.fused_adamw = fused_adamw
        self.muon_update = muon_update
        if compile_backend is not None:
            self.muon_update = torch.compile(muon_update, backend=compile_backend, fullgraph=True, dynamic=False)

    @torch.no_grad()
    def step(self, closure=None):
        for group, lr_tensor in zip(self.param_groups, self.lr_tensors, strict=True):
            if group["use_muon"]:
                self._muon_step(group, lr_tensor)
            elif self.fused_adamw:
                self._fused_adamw_step(group)
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

    def _adamw_states(self, group: dict) -> tuple[list[torch.Tensor], list[dict]]:
        """The group's parameters that have a gradient, and their AdamW states (made at the first step)."""
        params = [p for p in group["params"] if p.grad is not None]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        return params, states

    def _adamw_step(self, group: dict) -> None:
        params, states = self._adamw_states(group)
        if not params:
            return
        for state in states:
            if torch.is_tensor(state["step"]):  # saved by the fused step: back to a count on the host, once
                state["step"] = int(state["step"].item())
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

    def _fused_adamw_step(self, group: dict) -> None:
        """torch.optim.AdamW's fused kernel: one launch for the whole group. Its step counts are tensors on the
        parameters' device, which it reads there, so nothing waits for the host."""
        params, states = self._adamw_states(group)
        if not params:
            return
        for p, state in zip(params, states, strict=True):
            step = state["step"]
            if not torch.is_tensor(step) or step.device != p.device:  # made here, or saved by the foreach step
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        (beta1, beta2) = group["betas"]
        torch._fused_adamw_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], steps, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            eps=group["eps"], amsgrad=False, maximize=False,
        )  # fmt: skip


def muon_matrix_shape(name: str, p: torch.Tensor) -> tuple[int, int]:
    """The shape of the matrices Muon orthogonalizes in a hidden weight: attention's c_attn is q, k and v."""
    rows, cols = p.shape
    return (rows // 3, cols) if name.endswith("attn.c_attn.weight") else (rows, cols)


def parameter_role(name: str, p: torch.Tensor) -> str:
    """What a parameter is, for the optimizer: a hidden matrix of the blocks, a table (token, position or value
    embedding), the output head, or a vector (norm weights, biases, the techniques' learned scalars)."""
    if p.dim() < 2:
        return "scalar"
    if name.startswith("transformer.h."):
        return "hidden"
    return "head" if name.startswith("lm_head.") else "embedding"


def adamw_groups(
    params: list[tuple[torch.Tensor, float, float]], always: tuple[tuple[float, float], ...] = ()
) -> list[dict]:
    """One group per distinct (learning rate, weight decay) of the (parameter, lr, weight decay) triples, in the
    order their first parameter comes (the `always` ones first, even when empty), each group's parameters in the
    order given. With every rate the same, the groups are exactly those of the plain setup, so the checkpoints of
    runs without separate rates keep loading."""
    groups: dict[tuple[float, float], list[torch.Tensor]] = {key: [] for key in always}
    for p, lr, weight_decay in params:
        groups.setdefault((lr, weight_decay), []).append(p)
    return [{"params": group, "lr": lr, "weight_decay": wd} for (lr, wd), group in groups.items()]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.arch in ARCHS, f"arch must be one of {ARCHS}"
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
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
        self._add_techniques()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def _add_techniques(self) -> None:
        """The switched-on techniques' parameters and initial values, made after every plain weight is drawn."""
        cfg = self.config
        if cfg.zero_init_proj:  # each block starts as the identity (modded-nanogpt, nanochat)
            for block in self.transformer.h:
                block.attn.c_proj.weight.zero_()
                block.mlp.c_proj.weight.zero_()
        if cfg.zero_init_head:
            self.lm_head.weight.zero_()
        if cfg.x0_mix:  # block input = resid * x + x0 * embedding: the plain stream at first
            self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(cfg.n_layer))
        if cfg.unet_skips:
            self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        if cfg.value_embeds:
            self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.n_embd) for _ in range(cfg.value_embeds))
            for table in self.value_embeds:  # at v's scale: weights of std 0.02 over n_embd normalized channels
                table.weight.normal_(mean=0.0, std=0.02 * math.sqrt(cfg.n_embd))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Without targets: the last position's logits (B, 1, V), for sampling, and no loss. With targets: no
        logits, and the mean loss, or with reduction "none" the loss of every target token (B, T)."""
        x, cap = self.transformer.ln_f(self.trunk(idx)), self.config.logit_softcap
        if targets is None:
            logits = self.lm_head(x[:, [-1], :])  # only the last position is needed to sample
            return (softcap(logits.float(), cap) if cap else logits), None  # the cap in fp32, which bf16 blurs
        return None, cross_entropy(self.lm_head(x).float(), targets, reduction, cap)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence of {T} tokens is longer than block_size"
        x = self.transformer.wte(idx)
        if not self.config.modern:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        if self.config.embed_norm:
            x = F.rms_norm(x, (x.size(-1),))
        return self.transformer.drop(x)

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        """The embedding through every block. A U-net skip joins the input of block i, in the first half, to the
        input of block n_layer - 1 - i; unlike the speedrun's (which feeds the first late block its own input
        again), every skip brings an earlier state, so two layers get one too."""
        cfg, T = self.config, idx.size(1)
        x = x0 = self.embed(idx)
        rotary = (self.rotary_cos[:T], self.rotary_sin[:T]) if cfg.modern else None
        value_embeds = [table(idx) for table in self.value_embeds] if cfg.value_embeds else []
        n, skips = cfg.n_layer, []
        for layer, block in enumerate(self.transformer.h):
            if cfg.x0_mix:
                x = self.resid_lambdas[layer] * x + self.x0_lambdas[layer] * x0
            if cfg.unet_skips and layer < n // 2:
                skips.append(x)
            elif cfg.unet_skips and layer >= n - n // 2:
                x = x + self.skip_weights[n - 1 - layer] * skips[n - 1 - layer]
            table = cfg.value_table(layer)
            x = block(x, rotary, None if table is None else value_embeds[table])
        return x

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
        muon_lr: float | None = None,
        compile_muon: bool | None = None,
        embedding_lr: float | None = None,
        head_lr: float | None = None,
        scalar_lr: float | None = None,
    ) -> torch.optim.Optimizer:
        """AdamW, with weight decay on matrices only; or, given `muon_lr`, Muon for the hidden matrices.

        `embedding_lr` (token, position and value embeddings), `head_lr` (an untied output head) and `scalar_lr`
        (vectors and scalars) default to `learning_rate`, which the hidden matrices take under AdamW. Every group
        records its peak rate as `initial_lr`, so a schedule scales all groups alike. Muon has one group per
        matrix shape. On CUDA: TF32 for fp32 matmuls (`enable_tf32`), fused AdamW, and Muon's update compiled
        unless `compile_muon` is False (it is compiled only on CUDA by default).
        """
        if device_type == "cuda":
            enable_tf32()
        rates = {
            "hidden": learning_rate,
            "embedding": learning_rate if embedding_lr is None else embedding_lr,
            "head": learning_rate if head_lr is None else head_lr,
            "scalar": learning_rate if scalar_lr is None else scalar_lr,
        }
        roles = [(name, p, parameter_role(name, p)) for name, p in self.named_parameters() if p.requires_grad]
        if muon_lr is None:
            triples = [(p, rates[role], 0.0 if role == "scalar" else weight_decay) for _, p, role in roles]
            groups = adamw_groups(triples, always=((learning_rate, weight_decay), (rates["scalar"], 0.0)))
            extra = {"fused": True} if device_type == "cuda" else {"foreach": True}
            optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
        else:
            by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
            for name, p, role in roles:
                if role == "hidden":
                    by_shape.setdefault(muon_matrix_shape(name, p), []).append(p)
            groups = [
                {"params": group, "use_muon": True, "lr": muon_lr, "matrix_shape": shape}
                for shape, group in by_shape.items()
            ]
            triples = [(p, rates[r], 0.0 if r == "scalar" else weight_decay) for _, p, r in roles if r != "hidden"]
            groups += [group | {"use_muon": False} for group in adamw_groups(triples)]
            compile_muon = device_type == "cuda" if compile_muon is None else compile_muon
            backend = "inductor" if compile_muon else None
            optimizer = Muon(groups, betas=betas, compile_backend=backend, fused_adamw=device_type == "cuda")
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores and values."""
        cfg = self.config
        # Embedding lookups are not matmuls: drop the position and value tables, and the token table unless tied.
        lookups = [self.transformer.wte if cfg.modern else self.transformer.wpe]
        lookups += list(self.value_embeds) if cfg.value_embeds else []
        n_weights = self.num_params() - sum(table.weight.numel() for table in lookups)
        return 6 * n_weights + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def training_memory(
        self, batch_size: int, dtype: torch.dtype = torch.float32, weights_on_device: bool = False
    ) -> int:
        """About the peak bytes of one training step under autocast to `dtype` (float32: none): weights (unless
        `weights_on_device`, when a free-memory figure already leaves them out), two optimizer states, then the
        larger of the activations kept for backward and the gradients with the optimizer's temporaries.

        Activations: per layer and channel about 18 values in `dtype` and two residual-stream copies in fp32 (what
        the modern block keeps); x0_mix, unet_skips and each value-embedding layer keep about one more fp32 value.
        Logits: two fp32 copies (the logits and their softmax, which becomes the gradient), one more in `dtype`
        under autocast (the head's own output), one more with the soft cap. tests/test_model.py checks the figure
        against a measured peak on the CPU.
        """
        cfg, n_params = self.config, self.num_params()
        size = torch.empty((), dtype=dtype).element_size()
        extras = cfg.n_layer * (cfg.x0_mix + cfg.unet_skips) + 2 * cfg.value_embeds
        per_token = cfg.n_embd * (cfg.n_layer * (18 * size + 2 * 4) + 4 * extras)
        per_token += cfg.vocab_size * (2 * 4 + (size if size < 4 else 0) + (4 if cfg.logit_softcap else 0))
        activations = batch_size * cfg.block_size * per_token
        weights = 0 if weights_on_device else 4 * n_params
        return weights + 8 * n_params + max(activations, 8 * n_params)

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
