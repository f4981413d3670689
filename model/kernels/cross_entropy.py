"""Language-model head plus cross-entropy: mean loss over tokens whose label is not ignore_index.

The fused version never holds the full [tokens, vocab] logits. It walks the tokens in chunks:
a chunk's logits come from one matmul, a Triton kernel turns them in place into per-token
losses and d(loss)/d(logits) (softmax minus one-hot, by an online logsumexp over vocab tiles),
and two more matmuls add the chunk's share of the hidden-state and weight gradients (already
divided by the count of tokens, in fp32 as torch does). The gradients are thus ready after the
forward pass; the backward pass only multiplies them by the incoming gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels._triton import elements_per_program, jit, tl, triton

IGNORE_INDEX = -100


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """hidden: [tokens, hidden]; weight: [vocab, hidden]; labels: [tokens]."""
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


@jit
def _loss_and_grad_kernel(
    logits_ptr,
    labels_ptr,
    loss_ptr,
    scale_ptr,
    rows,
    vocab,
    ignore_index,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row: loss = logsumexp(logits) - logits[label]; logits <- (softmax - onehot(label)) * scale,
    scale being 1 / (counted tokens). Rows whose label is ignore_index get loss 0 and a zero gradient."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < rows
    label = tl.load(labels_ptr + row, mask=row_ok, other=ignore_index)
    counted = label != ignore_index
    # Rows past the end repeat the last row (their results are not stored), so no row is all -inf.
    base = logits_ptr + tl.minimum(row, rows - 1)[:, None].to(tl.int64) * vocab
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        col = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + col[None, :], mask=col[None, :] < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
        target += tl.sum(tl.where(col[None, :] == label[:, None], x, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    tl.store(loss_ptr + row, tl.where(counted, lse - target, 0.0), mask=row_ok)
    scale = tl.load(scale_ptr)
    for start in range(0, vocab, BLOCK_V):
        col = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (col[None, :] < vocab)
        x = tl.load(base + col[None, :], mask=col[None, :] < vocab, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse[:, None]) - tl.where(col[None, :] == label[:, None], 1.0, 0.0)
        grad = tl.where(counted[:, None], grad * scale, 0.0)
        tl.store(base + col[None, :], grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: the chunk's logits take about as much memory as the hidden states."""
    return triton.next_power_of_2(triton.cdiv(tokens, triton.cdiv(vocab, hidden)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int
    ) -> torch.Tensor:
        tokens, width = hidden.shape
        vocab = weight.shape[0]
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]
        block_v = min(triton.next_power_of_2(vocab), 1024)
        chunk = _chunk_rows(tokens, width, vocab)
        block_m = max(1, min(chunk, elements_per_program() // block_v))
        losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        counted = (labels != ignore_index).sum()
        scale = 1.0 / counted.clamp(min=1).float()  # all ignored: NaN loss but zero gradients, like torch
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight) if need_weight_grad else None
        for start in range(0, tokens, chunk):
            stop = min(start + chunk, tokens)
            hidden_chunk = hidden[start:stop]
            logits = hidden_chunk @ weight.t()
            _loss_and_grad_kernel[(triton.cdiv(stop - start, block_m),)](
                logits,
                labels[start:stop],
                losses[start:stop],
                scale,
                stop - start,
                vocab,
                ignore_index,
                BLOCK_M=block_m,
                BLOCK_V=block_v,
            )
            if need_hidden_grad:
                torch.mm(logits, weight, out=grad_hidden[start:stop])
            if need_weight_grad:
                grad_weight.addmm_(logits.t(), hidden_chunk)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses.sum() / counted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
        )


def linear_cross_entropy_triton(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Fused head and mean cross-entropy; shapes as in linear_cross_entropy_reference.
    Labels must be ignore_index or in [0, vocab), checked on the device without a host sync."""
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < weight.shape[0]))
    torch._assert_async(valid.all(), "linear_cross_entropy: a label is outside [0, vocab) and not ignore_index")
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(), ignore_index)
