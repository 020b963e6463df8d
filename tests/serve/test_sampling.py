"""The token choice and stop-string rules of ``lorakit.sampling`` against direct computations."""

from __future__ import annotations

import torch

from lorakit.sampling import Sampling, StopText, _nucleus, choose, generator_for


def test_greedy_is_the_argmax_and_logprobs_are_log_softmax_in_float64():
    z = torch.randn(50, dtype=torch.float32)
    c = choose(z, Sampling(temperature=0, top_logprobs=3), generator_for(Sampling()))
    ref = torch.log_softmax(z.double(), -1)
    assert c.token == int(torch.argmax(z))
    torch.testing.assert_close(c.logprob, float(ref[c.token]))
    assert [t for t, _ in c.top] == torch.topk(ref, 3).indices.tolist()


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    torch.testing.assert_close(_nucleus(p, 0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(_nucleus(p, 0.8), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(_nucleus(p, 0.81), p[:3].tolist() + [0.0] and _nucleus(p, 0.81))
    assert _nucleus(p, 1e-9).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_sampling_follows_the_distribution_and_the_seed():
    z = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    s = Sampling(temperature=1.0, seed=5)
    draws = [choose(z, s, g).token for g in [generator_for(s)] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).double() / len(draws)
    torch.testing.assert_close(
        freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.03, rtol=0
    )  # binomial spread at n=4000 is under 0.01
    again = [choose(z, s, g).token for g in [generator_for(s)] for _ in range(4000)]
    assert draws == again


def test_stop_text_cuts_before_the_first_stop_and_holds_back_a_partial_one():
    stop = StopText(("END", "\n\n"))
    assert stop.scan("hello E") == ("hello ", False)
    assert stop.scan("hello EN") == ("hello ", False)
    assert stop.scan("hello ENx") == ("hello ENx", False)
    assert stop.scan("hello END more") == ("hello ", True)
    assert stop.scan("a\n\nb END") == ("a", True)
    assert StopText().scan("abc\ufffd") == ("abc", False)


def test_stop_text_since_ignores_stops_that_begin_before_it():
    stop = StopText(("ab",))
    assert stop.scan("xxabyyab", since=3) == ("xxabyy", True)
    assert stop.scan("xxab", since=3) == ("xxab", False)  # begins before 3: not a stop
    assert stop.scan("xxa", since=3) == ("xxa", False)  # a tail before ``since`` is not held
    assert stop.scan("xxaba", since=3) == ("xxab", False)  # one at 4 may still come


def test_banned_tokens_are_never_chosen_but_logprobs_stay_the_models():
    z = torch.tensor([5.0, 1.0, 0.0])
    greedy = Sampling(temperature=0, top_logprobs=1)
    c = choose(z, greedy, generator_for(greedy), banned=(0,))
    assert c.token == 1
    torch.testing.assert_close(c.logprob, float(torch.log_softmax(z, -1)[1]))
    assert c.top[0][0] == 0  # the model's most likely token is still reported
    hot = Sampling(temperature=2.0, seed=3)
    g = generator_for(hot)
    assert all(choose(z, hot, g, banned=(0, 2)).token == 1 for _ in range(200))
