"""Batched log-likelihood of texts with rolling windows: the engine of ``perplexity`` and ``agreement``.

Windows (lm-eval's ``loglikelihood_rolling`` convention, so the numbers agree with it): a document of ``n``
tokens is preceded by one prefix token and cut into windows of at most ``max_len`` model inputs; the first
window predicts the first ``min(n, max_len)`` tokens, every later window predicts the next ``max_len`` tokens
(or the rest) from the ``max_len`` tokens before its last prediction, so every token is predicted exactly
once, with the longest context that fits a window.

Batching: all windows of all documents are sorted by length (longest first) and cut into batches of at most
``batch_tokens`` padded tokens (and ``max_rows`` rows), a new batch starting where lengths drop by more than
10 %, so padding is a few percent of the tokens (lm-eval batches windows in document order and pads each
batch to its longest: about twice the tokens on FLORES+ at 64 rows); batches are right-padded and need no attention mask (a causal model never lets a
real position see the padding after it). The output head runs only on the scored positions' hidden states,
a chunk of positions at a time, so the [rows, width, vocabulary] logits tensor never exists (for a model whose
logits are not simply ``head(last_hidden_state)`` -- checked once per model -- the full forward is used).
Sums are accumulated in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Window:
    """``tokens[:-1]`` is the model input, ``tokens[-n_scored:]`` the predicted tokens, ``doc`` the source."""

    doc: int
    tokens: tuple[int, ...]
    n_scored: int

    @property
    def length(self) -> int:
        return len(self.tokens) - 1


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """``[(tokens of the window (inputs + last target), number of scored targets)]`` for one document."""
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    n = len(tokens)
    if n == 0:
        return []
    first = min(max_len, n)
    out = [([prefix, *tokens[:first]], first)]
    done = first
    while done < n:
        k = min(max_len, n - done)
        end = done + k  # predict tokens[done:end] from the max_len tokens before tokens[end - 1]
        out.append((list(tokens[end - max_len - 1:end]), k))
        done = end
    return out


def make_windows(docs: list[list[int]], prefix: int, max_len: int) -> list[Window]:
    return [Window(i, tuple(toks), k) for i, d in enumerate(docs) for toks, k in rolling_windows(d, prefix, max_len)]


def plan_batches(windows: list[Window], batch_tokens: int, max_rows: int, pad_tolerance: float = 0.1,
                 min_tokens: int = 256) -> list[list[int]]:
    """Indices of ``windows`` per batch: longest first, each batch ``rows x longest <= batch_tokens`` and at
    most ``max_rows`` rows; a batch of at least ``min_tokens`` tokens also ends where the next window is more
    than ``pad_tolerance`` shorter than its longest, so padding stays a few percent of the tokens."""
    order = sorted(range(len(windows)), key=lambda i: (-windows[i].length, i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = windows[cur[0]].length if cur else windows[i].length
        if cur and ((len(cur) + 1) * width > batch_tokens or len(cur) >= max_rows or (
                windows[i].length < width * (1.0 - pad_tolerance) and len(cur) * width >= min_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _batch_tensors(windows: list[Window], idx: list[int], pad: int, device: str) -> tuple[Any, Any, Any]:
    """(input ids [B, T], scored mask [B, T], targets of the scored positions in row-major order)."""
    import torch

    width = max(windows[i].length for i in idx)
    ids = torch.full((len(idx), width), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.bool)
    targets: list[int] = []
    for r, i in enumerate(idx):
        w = windows[i]
        ids[r, : w.length] = torch.tensor(w.tokens[:-1], dtype=torch.long)
        mask[r, w.length - w.n_scored : w.length] = True
        targets.extend(w.tokens[-w.n_scored:])
    return ids.to(device), mask.to(device), torch.tensor(targets, dtype=torch.long, device=device)


def split_head(model: Any) -> tuple[Any, Any] | None:
    """``(decoder, output head)`` when ``logits == head(decoder(ids).last_hidden_state)`` for this model,
    checked once on a probe sequence (an architecture that scales or caps its logits fails the check and is
    scored through its full forward instead); cached on the model."""
    cached = getattr(model, "_adaptkit_head_split", None)
    if cached is not None:
        return cached or None
    import torch

    split: Any = False
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        if decoder is not None and head is not None and decoder is not model:
            vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
            ids = (torch.arange(3, 3 + 8 * 97, 97) % max(vocab - 1, 1)).view(1, -1).to(model.device)
            with torch.inference_mode():
                full = model(input_ids=ids).logits.float()
                mine = head(decoder(input_ids=ids).last_hidden_state).float()
            if mine.shape == full.shape and torch.allclose(mine, full, rtol=1e-4, atol=1e-4):
                split = (decoder, head)
    except Exception:  # noqa: BLE001 - any surprise: use the full forward
        split = False
    try:
        model._adaptkit_head_split = split
    except Exception:  # noqa: BLE001 - a model that refuses attributes just re-checks next time
        pass
    return split or None


class ScoredLogits:
    """The float32 logits of a batch's scored positions, produced ``chunk`` positions at a time (through the
    output head when the model splits, so the full [rows, width, vocab] logits never exist)."""

    def __init__(self, *, hidden: Any = None, head: Any = None, logits: Any = None, chunk: int = 512) -> None:
        self.hidden, self.head, self.logits, self.chunk = hidden, head, logits, chunk
        self.n = int(hidden.shape[0] if hidden is not None else logits.shape[0])

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        import torch

        for s in range(0, self.n, self.chunk):
            # inference mode around the computation only, never across a yield: a generator suspended inside the
            # context would leave the caller's grad mode switched off (and interleaved generators, as agreement
            # runs two, restore it out of order)
            with torch.inference_mode():
                if self.hidden is not None:
                    out = self.head(self.hidden[s : s + self.chunk]).float()
                else:
                    out = self.logits[s : s + self.chunk].float()
            yield s, out


def scored_logits(model: Any, windows: list[Window], batch_tokens: int, max_rows: int, device: str = "cpu",
                  pad: int = 0, progress: Callable[[int, int], None] | None = None, chunk: int = 512
                  ) -> Iterator[tuple[list[int], ScoredLogits, Any]]:
    """For each batch: (window indices, the scored positions' logits in chunks, targets [N]); rows are in
    window order within the batch, positions in order within a row."""
    import torch

    batches = plan_batches(windows, batch_tokens, max_rows)
    split = split_head(model)
    done = 0
    for idx in batches:
        with torch.inference_mode():  # not across the yield (see ScoredLogits.__iter__)
            ids, mask, targets = _batch_tensors(windows, idx, pad, device)
            if split is not None:
                scored = ScoredLogits(hidden=split[0](input_ids=ids).last_hidden_state[mask], head=split[1], chunk=chunk)
            else:
                scored = ScoredLogits(logits=model(input_ids=ids).logits[mask], chunk=chunk)
        yield idx, scored, targets
        done += len(idx)
        if progress is not None:
            progress(done, len(windows))


def window_nll(scored: ScoredLogits, targets: Any) -> Any:
    """Negative log-likelihood (nats, float32) of each scored position."""
    import torch

    parts = []
    for s, logits in scored:
        t = targets[s : s + logits.shape[0]]
        parts.append(torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1))
    return torch.cat(parts) if parts else targets.new_zeros((0,), dtype=torch.float32)


def document_nll(model: Any, docs: list[list[int]], *, prefix: int, max_len: int, batch_tokens: int,
                 max_rows: int, device: str = "cpu", pad: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Summed negative log-likelihood (nats) of every document."""
    windows = make_windows(docs, prefix, max_len)
    totals = [0.0] * len(docs)
    for idx, sel, targets in scored_logits(model, windows, batch_tokens, max_rows, device, pad, progress):
        nll = window_nll(sel, targets).double().cpu()
        pos = 0
        for i in idx:
            k = windows[i].n_scored
            totals[windows[i].doc] += float(nll[pos : pos + k].sum())
            pos += k
    return totals
