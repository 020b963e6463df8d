"""Choosing the next token and knowing when to stop: what a decoding loop does with the logits of
one step, row by row, for the server's engine (and any loop that drives the steps itself).

A row's ``Sampling`` says how its next token is picked from the logits ``z`` (vocab,):

- ``temperature == 0``: greedy, ``argmax z`` (what ``lorakit generate`` does);
- otherwise ``p = softmax(z / T)``, cut to the smallest set of tokens whose mass reaches ``top_p``
  (nucleus sampling, Holtzman et al. 2019, section 3.1), renormalised, and drawn with the row's own
  ``torch.Generator``, so that one seed gives one text whatever else shares the batch.

Log-probabilities reported back are those of the model's distribution, ``log_softmax(z)``, before
temperature and top-p (as vLLM and OpenAI report them). ``StopText`` finds stop strings in the
text decoded so far and holds back a tail that may still become one, so a stream never sends text
that a later stop string takes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens; ``top_logprobs`` None: no log-probabilities wanted."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int | None = None


@dataclass(frozen=True)
class Choice:
    """One step's pick: the token, its log-probability, and the most likely tokens with theirs."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def generator_for(sampling: Sampling, device: torch.device | str = "cpu") -> torch.Generator:
    """The row's random stream: seeded with ``sampling.seed``, or from the OS when it has none."""
    g = torch.Generator(device=device)
    if sampling.seed is None:
        g.seed()
    else:
        g.manual_seed(sampling.seed % 2**63)  # any integer: torch takes 63 bits
    return g


def choose(
    logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator,
    banned: tuple[int, ...] = (),
) -> Choice:
    """The next token for one row from its logits ``(vocab,)``; never one of ``banned`` (the
    end-of-text ids before a request's ``min_tokens``). Log-probabilities stay the model's."""
    z = logits.float()
    pick = z
    if banned:
        pick = z.clone()
        pick[list(banned)] = float("-inf")
    if sampling.temperature == 0:
        token = int(torch.argmax(pick))
    else:
        probs = torch.softmax(pick / sampling.temperature, dim=-1)
        if sampling.top_p < 1:
            probs = _nucleus(probs, sampling.top_p)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if sampling.top_logprobs is None:
        return Choice(token)
    logp = torch.log_softmax(z, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if sampling.top_logprobs > 0:
        values, ids = torch.topk(logp, min(sampling.top_logprobs, logp.numel()))
        top = tuple(zip(ids.tolist(), values.tolist()))
    return Choice(token, float(logp[token]), top)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` kept on the smallest most-likely set whose mass reaches ``top_p``, renormalised
    (the most likely token is always kept)."""
    sorted_p, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return kept / kept.sum()


class StopText:
    """Stop strings over a growing text: ``scan(text)`` gives (the part safe to show, stopped).

    ``text`` is everything decoded so far. When a stop string occurs, the text ends before its
    first occurrence (stop strings are not echoed) and ``stopped`` is True. Otherwise the part safe
    to show leaves out a tail that is the beginning of a stop string, and a trailing U+FFFD (a
    character whose bytes are not all decoded yet).
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)

    def scan(self, text: str, since: int = 0) -> tuple[str, bool]:
        """``since``: stop strings count only where they begin at or after this index (text
        before it was shown already, or came before a request's ``min_tokens``)."""
        hits = [i for i in (text.find(s, since) for s in self.stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
        keep = len(text)
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    keep = min(keep, len(text) - k)
                    break
        keep = max(keep, min(since, len(text)))
        while keep > 0 and text[keep - 1] == "\ufffd":
            keep -= 1
        return text[:keep], False
