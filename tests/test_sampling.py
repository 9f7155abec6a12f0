"""Sampling: `sample_next` on hand-made logits against plain-torch / hand-computed references, and
sampling features end to end on the default model (determinism under batching, min_tokens,
ignore_eos, stop strings and ids, logprobs against transformers, streaming and early abort)."""

from __future__ import annotations

import math

import pytest
import torch

from loramux.engine.sampling import (
    MAX_LOGPROBS,
    TOP_P_CANDIDATES,
    InvalidParam,
    SamplingParams,
    TokenLogprob,
    choose_tokens,
    sample_next,
    token_logprobs,
)


def draws(logits, params, n, seed=0, **kwargs) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [sample_next(logits, params, g, **kwargs)[0] for _ in range(n)]


def argmax(values) -> int:
    values = list(map(float, values))
    return max(range(len(values)), key=values.__getitem__)


def chi_square(counts: dict[int, int], probs: list[float], n: int) -> float:
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if p > 0)


def softmax(xs) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def counts_of(tokens) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tokens:
        out[t] = out.get(t, 0) + 1
    return out


# --- greedy, top-k, top-p, temperature --------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 3
    token, lp = sample_next(logits, SamplingParams(), torch.Generator())
    assert token == argmax(logits.tolist())
    assert lp is None


def test_greedy_picks_the_last_position_too():
    logits = torch.zeros(50)
    logits[-1] = 0.5
    assert sample_next(logits, SamplingParams(), torch.Generator())[0] == 49


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_top_k_1_is_greedy(temperature):
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    best = argmax(logits.tolist())
    assert set(draws(logits, SamplingParams(temperature=temperature, top_k=1), 200)) == {best}


def test_tiny_top_p_is_greedy():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(2)) * 0.1  # nearly flat
    best = argmax(logits.tolist())
    assert set(draws(logits, SamplingParams(temperature=1.5, top_p=1e-6), 200)) == {best}


def test_top_k_keeps_only_the_k_best():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.5
    k = 5
    best = set(sorted(range(64), key=lambda i: -float(logits[i]))[:k])
    seen = set(draws(logits, SamplingParams(temperature=2.0, top_k=k), 2000))
    assert seen == best  # all k appear, nothing else does


def test_top_k_distribution_is_the_renormalised_top_k():
    logits = torch.tensor([0.2, 1.0, -0.5, 0.7, 0.0, 1.3])
    n = 4000
    tokens = draws(logits, SamplingParams(temperature=1.0, top_k=3), n, seed=11)
    kept = [1, 3, 5]
    p = softmax([float(logits[i]) for i in kept])
    probs = [0.0] * 6
    for i, q in zip(kept, p):
        probs[i] = q
    c = counts_of(tokens)
    assert set(c) == set(kept)
    assert chi_square(c, probs, n) < 16.0  # df=2, p ~ 3e-4


# token probabilities, placed out of order in the vocab
TOP_P_PROBS = {3: 0.5, 0: 0.3, 5: 0.15, 1: 0.05}


def _top_p_logits() -> torch.Tensor:
    logits = torch.full((8,), -1e9)
    for i, p in TOP_P_PROBS.items():
        logits[i] = math.log(p)
    return logits


@pytest.mark.parametrize(
    "top_p,kept",
    [(0.3, {3}), (0.49, {3}), (0.7, {3, 0}), (0.78, {3, 0}), (0.85, {3, 0, 5}), (0.94, {3, 0, 5}), (0.97, {3, 0, 5, 1}), (1.0, {3, 0, 5, 1})],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    n = 3000
    tokens = draws(_top_p_logits(), SamplingParams(temperature=1.0, top_p=top_p), n, seed=5)
    c = counts_of(tokens)
    assert set(c) == kept
    mass = sum(TOP_P_PROBS[i] for i in kept)
    probs = [TOP_P_PROBS.get(i, 0.0) / mass if i in kept else 0.0 for i in range(8)]
    assert chi_square(c, probs, n) < 20.0


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_minus_one_and_zero_are_off(top_k):
    logits = torch.tensor([0.0, 0.5, 1.0, -1.0])
    n = 8000
    counts = counts_of(draws(logits, SamplingParams(temperature=1.0, top_k=top_k), n, seed=5))
    assert chi_square(counts, softmax([0.0, 0.5, 1.0, -1.0]), n) < 16.3  # 3 dof, p = 0.001


@pytest.mark.parametrize("temperature, min_p, kept", [
    # at T=1 the probabilities are (0.066, 0.179, 0.488, 0.024, 0.242)
    (1.0, 0.3, [1, 2, 4]),  # threshold 0.3 x 0.488 = 0.146
    (1.0, 0.45, [2, 4]),    # threshold 0.219
    # at T=0.5 they are (0.013, 0.096, 0.713, 0.002, 0.176): min_p applies after temperature
    (0.5, 0.2, [2, 4]),     # threshold 0.143
    (0.5, 0.3, [2]),        # threshold 0.214
])
def test_min_p_keeps_tokens_within_min_p_of_the_best_after_temperature(temperature, min_p, kept):
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 1.3])
    tempered = softmax([x / temperature for x in logits.tolist()])
    n = 6000
    counts = counts_of(draws(logits, SamplingParams(temperature=temperature, min_p=min_p), n, seed=3))
    assert sorted(counts) == kept
    renormalised = [tempered[i] / sum(tempered[j] for j in kept) if i in kept else 0.0 for i in range(5)]
    assert chi_square(counts, renormalised, n) < 16.3


def test_min_p_one_is_greedy_and_zero_is_off():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(4))
    assert set(draws(logits, SamplingParams(temperature=1.5, min_p=1.0), 100)) == {argmax(logits.tolist())}
    assert draws(logits, SamplingParams(temperature=1.0, min_p=0.0), 50, seed=8) == draws(logits, SamplingParams(temperature=1.0), 50, seed=8)


def test_logit_bias_is_added_to_the_logits_before_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0, 0.5])
    assert draws(logits, SamplingParams(logit_bias={1: -100}), 1) == [2]  # greedy: the second best
    assert set(draws(logits, SamplingParams(temperature=1.0, logit_bias={3: 100}), 200)) == {3}
    # a bias of 1.0 on token 0 is the distribution of logits + (1, 0, 0, 0)
    n = 8000
    counts = counts_of(draws(logits, SamplingParams(temperature=1.0, logit_bias={0: 1.0}), n, seed=2))
    assert chi_square(counts, softmax([1.0, 3.0, 1.0, 0.5]), n) < 16.3
    # log-probabilities stay those of the model's raw distribution
    _, lp = sample_next(logits, SamplingParams(logit_bias={0: 100}, logprobs=1), torch.Generator())
    assert lp.token_id == 0 and lp.logprob == pytest.approx(math.log(softmax(logits.tolist())[0]), abs=1e-6)


def test_token_logprobs_give_log_softmax_rank_and_top_k():
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0], [1.0, 1.0, 0.0, -1.0]])
    out = token_logprobs(logits, torch.tensor([2, 3]), 2)
    first = [math.log(p) for p in softmax([0.0, 2.0, 1.0, 3.0])]
    assert out[0].token_id == 2 and out[0].logprob == pytest.approx(first[2]) and out[0].rank == 3
    assert [t for t, _ in out[0].top] == [3, 1] and out[0].top[0][1] == pytest.approx(first[3])
    assert out[1].rank == 4 and out[1].top[0][1] == pytest.approx(out[1].top[1][1])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    n = 4000
    tokens = draws(logits, SamplingParams(temperature=temperature), n, seed=13)
    probs = softmax([x / temperature for x in logits.tolist()])
    # df=5: P(chi2 > 25) ~ 1.4e-4; a wrong temperature or distribution gives hundreds
    assert chi_square(counts_of(tokens), probs, n) < 25.0


# --- seeds -------------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seeds_differ():
    logits = torch.zeros(1000)  # flat
    params = SamplingParams(temperature=1.0, seed=1234)

    def run(p):
        g = p.generator()
        return [sample_next(logits, p, g)[0] for _ in range(30)]

    a, b = run(params), run(params)
    assert a == b
    assert len(set(a)) > 20  # really random, not a constant
    assert run(SamplingParams(temperature=1.0, seed=1235)) != a
    assert run(SamplingParams(temperature=1.0)) != run(SamplingParams(temperature=1.0))  # unseeded


# --- penalties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("freq,expected", [(0.24, 0), (0.26, 1)])
def test_frequency_penalty_counts_occurrences(freq, expected):
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0])
    # token 0 appears twice: its score is 3 - 2*freq, below 2.5 exactly when freq > 0.25
    token, _ = sample_next(logits, SamplingParams(frequency_penalty=freq), torch.Generator(), output_ids=[0, 2, 0])
    assert token == expected


@pytest.mark.parametrize("presence,expected", [(0.49, 0), (0.51, 1)])
def test_presence_penalty_is_once_per_token(presence, expected):
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0])
    # token 0 appears three times, but the presence penalty applies once: 3 - presence vs 2.5
    token, _ = sample_next(logits, SamplingParams(presence_penalty=presence), torch.Generator(), output_ids=[0, 0, 0])
    assert token == expected


def test_presence_and_frequency_penalties_ignore_the_prompt():
    logits = torch.tensor([3.0, 2.5, 0.0])
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0)
    assert sample_next(logits, params, torch.Generator(), prompt_ids=[0] * 10, output_ids=[])[0] == 0
    assert sample_next(logits, params, torch.Generator(), prompt_ids=[0] * 10, output_ids=[2])[0] == 0
    assert sample_next(logits, params, torch.Generator(), prompt_ids=[], output_ids=[0])[0] == 1


def test_negative_penalties_encourage_repeats():
    logits = torch.tensor([3.0, 2.5, 0.0])
    params = SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5)
    # token 2: 0 + 2*0.5 + 1 = 2.0 < 3; three times: 0 + 1.5 + 1 = 2.5 < 3; four times: 3.0; five: 3.5
    assert sample_next(logits, params, torch.Generator(), output_ids=[2, 2, 2])[0] == 0
    assert sample_next(logits, params, torch.Generator(), output_ids=[2] * 5)[0] == 2


@pytest.mark.parametrize("seed", range(30))
def test_presence_frequency_penalties_match_the_formula(seed):
    g = torch.Generator().manual_seed(seed)
    vocab = 12
    logits = torch.randn(vocab, generator=g)
    output_ids = torch.randint(0, vocab, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
    prompt_ids = torch.randint(0, vocab, (5,), generator=g).tolist()
    freq, presence = (torch.rand(2, generator=g) * 4 - 2).tolist()
    params = SamplingParams(frequency_penalty=freq, presence_penalty=presence)
    expected = [
        float(logits[i]) - freq * output_ids.count(i) - presence * (1.0 if i in output_ids else 0.0) for i in range(vocab)
    ]
    token, _ = sample_next(logits, params, torch.Generator(), prompt_ids=prompt_ids, output_ids=output_ids)
    assert token == argmax(expected)
    # the whole distribution, with temperature: sample and compare to softmax of the adjusted scores
    if seed < 3:
        n = 3000
        tokens = draws(logits, SamplingParams(temperature=1.0, frequency_penalty=freq, presence_penalty=presence), n, seed=seed, output_ids=output_ids)
        assert chi_square(counts_of(tokens), softmax(expected), n) < 40.0  # df=11


def _transformers_repetition(logits, penalty, ids):
    from transformers import RepetitionPenaltyLogitsProcessor

    proc = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    return proc(torch.tensor([list(ids)], dtype=torch.long), logits.clone()[None])[0]


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    """Probes each adjusted score exactly: a greedy pick between a seen token t (original score x) and
    an unseen probe token set just below / just above transformers' adjusted score of t."""
    vocab = 16
    prompt_ids, output_ids = [1, 2, 3, 2], [3, 4, 5, 5]
    values = {1: 1.7, 2: -0.8, 3: 0.6, 4: -2.5, 5: 3.1}  # both signs
    probe = 9  # never seen
    for t, x in values.items():
        logits = torch.full((vocab,), -50.0)
        logits[t] = x
        ref = float(_transformers_repetition(logits, penalty, prompt_ids + output_ids)[t])
        assert ref != pytest.approx(x)  # the penalty does move it
        params = SamplingParams(repetition_penalty=penalty)
        for offset, winner in [(-1e-3, t), (1e-3, probe)]:
            probed = logits.clone()
            probed[probe] = ref + offset
            assert float(_transformers_repetition(probed, penalty, prompt_ids + output_ids)[probe]) == pytest.approx(ref + offset)
            got, _ = sample_next(probed, params, torch.Generator(), prompt_ids=prompt_ids, output_ids=output_ids)
            assert got == winner, (t, x, ref, offset)


@pytest.mark.parametrize("seed", range(20))
def test_repetition_penalty_random_cases_match_transformers(seed):
    g = torch.Generator().manual_seed(100 + seed)
    vocab = 10
    logits = torch.randn(vocab, generator=g) * 2
    prompt_ids = torch.randint(0, vocab, (4,), generator=g).tolist()
    output_ids = torch.randint(0, vocab, (3,), generator=g).tolist()
    penalty = float(torch.rand(1, generator=g) * 2.5 + 0.2)
    ref = _transformers_repetition(logits, penalty, prompt_ids + output_ids)
    token, _ = sample_next(logits, SamplingParams(repetition_penalty=penalty), torch.Generator(), prompt_ids=prompt_ids, output_ids=output_ids)
    assert token == argmax(ref.tolist())
    if seed < 3:
        n = 3000
        tokens = draws(logits, SamplingParams(temperature=1.0, repetition_penalty=penalty), n, seed=seed, prompt_ids=prompt_ids, output_ids=output_ids)
        assert chi_square(counts_of(tokens), softmax(ref.tolist()), n) < 35.0  # df=9


# --- blocked ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=0.01),
        SamplingParams(temperature=0.7, top_k=3, top_p=0.9),
    ],
    ids=["greedy", "t1", "topk1", "topp", "mixed"],
)
def test_blocked_ids_are_never_chosen(params):
    logits = torch.tensor([0.0, 10.0, 1.0, 9.0, 0.5, 2.0])  # 1 and 3 hold nearly all the mass
    tokens = draws(logits, params, 300, blocked_ids=[1, 3])
    assert not {1, 3} & set(tokens)
    if params.greedy or params.top_k == 1 or params.top_p == 0.01:
        assert set(tokens) == {5}  # the best of what is left


def test_blocking_does_not_change_the_rest_of_the_distribution():
    logits = torch.tensor([0.0, 10.0, 1.0, 0.5])
    n = 3000
    tokens = draws(logits, SamplingParams(temperature=1.0), n, seed=3, blocked_ids=[1])
    probs = softmax([0.0, 1.0, 0.5])
    assert chi_square(counts_of(tokens), [probs[0], 0.0, probs[1], probs[2]], n) < 20.0


# --- logprobs ----------------------------------------------------------------------------------


def _reference_logprobs(logits: torch.Tensor) -> list[float]:
    xs = logits.double().tolist()
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("k", [1, 5, MAX_LOGPROBS])
def test_logprobs_are_the_raw_log_softmax(temperature, k):
    logits = torch.randn(300, generator=torch.Generator().manual_seed(k)) * 3
    ref = _reference_logprobs(logits)
    order = sorted(range(300), key=lambda i: -ref[i])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        token, lp = sample_next(logits, SamplingParams(temperature=temperature, logprobs=k), g)
        assert isinstance(lp, TokenLogprob)
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(ref[token], abs=1e-5)
        assert [i for i, _ in lp.top] == order[:k]
        assert [v for _, v in lp.top] == pytest.approx([ref[i] for i in order[:k]], abs=1e-5)


def test_logprobs_zero_gives_no_alternatives_and_none_gives_none():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    ref = _reference_logprobs(logits)
    token, lp = sample_next(logits, SamplingParams(temperature=1.0, logprobs=0), torch.Generator().manual_seed(1))
    assert lp is not None and lp.top == ()
    assert lp.token_id == token and lp.logprob == pytest.approx(ref[token], abs=1e-5)
    assert sample_next(logits, SamplingParams(temperature=1.0, logprobs=None), torch.Generator())[1] is None


def test_logprobs_with_blocked_ids_report_the_model_distribution():
    logits = torch.tensor([0.0, 5.0, 1.0, 2.0])
    ref = _reference_logprobs(logits)
    token, lp = sample_next(logits, SamplingParams(logprobs=2), torch.Generator(), blocked_ids=[1])
    assert token == 3
    assert lp.logprob == pytest.approx(ref[3], abs=1e-6)
    assert [i for i, _ in lp.top] == [1, 3]


def test_greedy_takes_the_best_of_the_adjusted_scores():
    logits = torch.tensor([0.0, 5.0, 1.0, 2.0])
    greedy = SamplingParams()
    assert sample_next(logits, greedy, torch.Generator())[0] == 1
    assert sample_next(logits, greedy, torch.Generator(), blocked_ids=[1])[0] == 3
    assert sample_next(logits, SamplingParams(frequency_penalty=2.0), torch.Generator(), output_ids=[1, 1])[0] == 3
    sampled = SamplingParams(temperature=1.0)
    assert {sample_next(logits, sampled, torch.Generator().manual_seed(s))[0] for s in range(40)} != {1}


BATCH_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.5, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01),
    SamplingParams(temperature=1.0, top_p=0.999),  # past the first 64 candidates of a flat row
    SamplingParams(top_k=3),  # greedy: filters do not matter
]


@pytest.mark.parametrize("seed", range(3))
def test_a_batch_chooses_what_each_row_would_alone(seed):
    """One choose_tokens call over rows with different parameters gives each row the token that
    row's own call gives with a generator in the same state, step after step."""
    g = torch.Generator().manual_seed(seed)
    vocab = 3000
    logits = torch.randn(len(BATCH_PARAMS), vocab, generator=g) * torch.tensor([4.0, 1.0, 3.0, 2.0, 4.0, 3.0, 0.3, 2.0])[:, None]
    batched = [torch.Generator().manual_seed(100 + i) for i in range(len(BATCH_PARAMS))]
    alone = [torch.Generator().manual_seed(100 + i) for i in range(len(BATCH_PARAMS))]
    for _ in range(20):
        together = choose_tokens(logits, BATCH_PARAMS, batched)
        one_by_one = [choose_tokens(logits[i : i + 1], [p], [alone[i]])[0] for i, p in enumerate(BATCH_PARAMS)]
        assert together == one_by_one
    assert together[0] == argmax(logits[0].tolist()) and together[-1] == argmax(logits[-1].tolist())


def test_top_p_past_the_first_candidates_keeps_the_same_prefix_as_a_full_sort():
    """A flat row whose top_p prefix is longer than the first TOP_P_CANDIDATES tokens: the kept set
    is the prefix of the sorted row (computed here with a full sort) whose mass before each token is
    below top_p, so every drawn token lies in it and draws reach deep into it."""
    logits = torch.randn(2000, generator=torch.Generator().manual_seed(3)) * 0.3
    top_p = 0.5
    order = torch.argsort(logits, descending=True)
    probs = torch.softmax(logits, -1)[order]
    prefix = set(order[: int((probs.cumsum(-1) - probs < top_p).sum())].tolist())
    assert len(prefix) > TOP_P_CANDIDATES
    tokens = draws(logits, SamplingParams(temperature=1.0, top_p=top_p), 3000, seed=1)
    assert set(tokens) <= prefix
    ranks = {int(t): r for r, t in enumerate(order.tolist())}
    assert max(ranks[t] for t in tokens) >= TOP_P_CANDIDATES


def test_sample_next_does_not_modify_the_logits():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(4))
    before = logits.clone()
    params = SamplingParams(
        temperature=0.9, top_k=10, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.5, logprobs=3
    )
    sample_next(logits, params, torch.Generator().manual_seed(0), prompt_ids=[1, 2, 3], output_ids=[3, 4, 4], blocked_ids=[5])
    assert torch.equal(logits, before)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(logit_bias={5: 100.5}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(max_tokens=0, logprobs=3), "max_tokens"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(presence_penalty=-2.5), "presence_penalty"),
        (dict(frequency_penalty=2.1), "frequency_penalty"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
    ],
)
def test_bad_sampling_params_are_refused(kwargs, name):
    with pytest.raises(InvalidParam, match=name) as e:
        SamplingParams(**kwargs)
    assert e.value.param == name


def test_edge_values_are_accepted():
    SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=0, presence_penalty=2, frequency_penalty=-2, logprobs=20)
    SamplingParams(max_tokens=3, min_tokens=3, logprobs=0, repetition_penalty=0.01)
    SamplingParams(top_k=-1, min_p=1.0, logit_bias={0: -100, 7: 100}, prompt_logprobs=20)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0  # scoring a prompt
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(logit_bias={9: 1, 3: -2}).logit_bias == ((3, -2.0), (9, 1.0))


def test_logit_bias_ids_are_checked_against_the_vocabulary():
    SamplingParams(logit_bias={99: 1.0}).check_vocab(100)
    with pytest.raises(InvalidParam, match="logit_bias") as e:
        SamplingParams(logit_bias={100: 1.0}).check_vocab(100)
    assert e.value.param == "logit_bias"


# --- the engine on the default model -----------------------------------------------------------


@pytest.fixture
def engine(default_engine):
    """The shared default engine, idle before and after each test."""
    for rid in list(default_engine.requests):
        default_engine.abort(rid)
    yield default_engine
    for rid in list(default_engine.requests):
        default_engine.abort(rid)


def _eos_ids(engine) -> set[int]:
    tok = engine.tokenizer
    return {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}


@pytest.mark.integration
def test_seeded_request_is_independent_of_its_batch(engine):
    prompt = "Write one sentence about the sea."
    mine = SamplingParams(temperature=0.8, seed=7, max_tokens=10)
    alone = engine.generate([prompt], params=mine)[0]
    again = engine.generate([prompt], params=mine)[0]
    assert alone.token_ids == again.token_ids
    others = ["Hello there", "List three colours:", "The sun is", "def add(a, b):", "Once upon a time"]
    params = [mine] + [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=4 + 2 * i) for i in range(5)]
    batched = engine.generate([prompt] + others, adapters=[None] * 6, params=params)
    assert batched[0].token_ids == alone.token_ids
    assert batched[0].text == alone.text
    # and a different seed does change the sample
    other_seed = engine.generate([prompt], params=SamplingParams(temperature=0.8, seed=8, max_tokens=10))[0]
    assert other_seed.token_ids != alone.token_ids


BRIEF = "Is the sky blue? Answer with one word."


@pytest.mark.integration
def test_min_tokens_blocks_end_of_sequence(engine):
    eos = _eos_ids(engine)
    free = engine.generate([BRIEF], chat=True, max_tokens=8)[0]
    assert free.finish_reason == "stop" and len(free.token_ids) < 8 and free.token_ids[-1] in eos  # the premise
    out = engine.generate([BRIEF], chat=True, max_tokens=8, min_tokens=8)[0]
    assert len(out.token_ids) == 8
    assert not eos & set(out.token_ids)
    assert out.finish_reason == "length"
    # before the EOS the greedy choice is unchanged
    n = len(free.token_ids) - 1
    assert out.token_ids[:n] == free.token_ids[:n]


@pytest.mark.integration
def test_ignore_eos_gives_exactly_max_tokens(engine):
    free = engine.generate([BRIEF], chat=True, max_tokens=8)[0]
    assert len(free.token_ids) < 8  # the premise: it would stop early
    out = engine.generate([BRIEF], chat=True, max_tokens=8, ignore_eos=True)[0]
    assert len(out.token_ids) == 8
    assert out.finish_reason == "length"
    assert out.token_ids[: len(free.token_ids)] == free.token_ids


@pytest.mark.integration
def test_stop_string_cuts_the_text(engine):
    tok = engine.tokenizer
    prompt = "The three largest cities in France are"
    full = engine.generate([prompt], max_tokens=16, ignore_eos=True)[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    mid = len(full.text) // 2
    stop = full.text[mid : mid + 4]
    assert stop.strip(), full.text
    cut = full.text[: full.text.index(stop)]
    out = engine.generate([prompt], max_tokens=16, ignore_eos=True, stop=[stop])[0]
    assert out.text == cut
    assert out.finish_reason == "stop"
    # it stopped on the token that completed the stop string
    n = next(i for i in range(1, len(full.token_ids) + 1) if stop in tok.decode(full.token_ids[:i], skip_special_tokens=True))
    assert out.token_ids == full.token_ids[:n]


@pytest.mark.integration
def test_stop_token_ids(engine):
    tok = engine.tokenizer
    prompt = "The three largest cities in France are"
    full = engine.generate([prompt], max_tokens=8, ignore_eos=True)[0]
    third = full.token_ids[2]
    assert third not in full.token_ids[:2]  # the premise: the first time it appears
    out = engine.generate([prompt], max_tokens=8, ignore_eos=True, stop_token_ids=[third])[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:3]
    assert out.text == tok.decode(full.token_ids[:2], skip_special_tokens=True)  # the stop token is not text


@pytest.mark.integration
def test_engine_logprobs_match_transformers(engine, default_hf):
    prompt = "My favourite food is"
    out = engine.generate([prompt], max_tokens=6, temperature=1.0, seed=3, logprobs=3, ignore_eos=True)[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        logits = default_hf(torch.tensor([ids])).logits[0].double()
    ref = torch.log_softmax(logits, dim=-1)
    n = len(out.prompt_token_ids)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[n - 1 + i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(row[token]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [i for i, _ in lp.top] == top.indices.tolist()


@pytest.mark.integration
def test_stream_matches_generate_and_closing_aborts(engine):
    prompt = "The capital of Italy is"
    gen = engine.generate([prompt], max_tokens=10)[0]
    outs = list(engine.stream(prompt, max_tokens=10))
    assert "".join(o.new_text for o in outs) == gen.text
    assert [t for o in outs for t in o.new_token_ids] == gen.token_ids
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert not engine.has_unfinished

    stream = engine.stream(prompt, max_tokens=50, ignore_eos=True)
    got = []
    for out in stream:
        got.append(out)
        if len(got) == 2:
            break
    assert engine.has_unfinished and engine.kv.allocator.num_used > 0  # the premise: still running
    stream.close()
    assert not engine.has_unfinished
    assert engine.kv.allocator.num_used == 0
    assert [t for o in got for t in o.new_token_ids] == gen.token_ids[:2]


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_vanishing_temperature_samples_the_best_token(temperature):
    """Found by fuzzing the server: dividing the scores by a tiny temperature overflowed them all
    to +-inf and softmax gave NaN, and a top_p that rounds to 0 in float32 dropped every token. As
    temperature falls to 0 sampling tends to greedy; top_p always keeps the best token."""
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1)) * 30
    params = SamplingParams(temperature=temperature, top_p=4.7e-111, seed=0)
    token, _ = sample_next(logits, params, params.generator())
    assert token == int(logits.argmax())


# --- prompt log-probabilities in the engine (tiny model, against transformers) ------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama directory, loaded by loramux (prompts prefilled in chunks of 7 rows) and
    by transformers."""
    from transformers import AutoModelForCausalLM

    from live_server import tiny_model_dir
    from loramux.engine.engine import Engine, EngineConfig
    from loramux.engine.scheduler import SchedulerConfig

    path = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny")
    engine = Engine.load(path, config=EngineConfig(scheduler=SchedulerConfig(max_prefill_chunk=7)))
    return engine, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax over the vocabulary at every position of `ids`: [len, vocab]."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_prompt_logprobs_across_prefill_chunks_and_preemption_match_transformers(tiny_pair):
    engine, hf = tiny_pair
    ids = engine.encode("The quick brown fox jumps over the lazy dog, and then it runs back home to sleep. " * 2)
    assert len(ids) > 30
    request = engine.add_request(ids, params=SamplingParams(max_tokens=2, prompt_logprobs=4))
    engine.step(), engine.step()  # two chunks of 7 rows: 14 of the prompt's entries known
    assert len(request.prompt_logprobs) == 15
    engine.scheduler._preempt(request)  # its KV is dropped: the prefill starts again from row 0
    outputs = []
    while engine.has_unfinished:
        outputs += [o for o in engine.step() if o.request_id == request.id]
    carried = [o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None]
    assert len(carried) == 1 and carried[0] == tuple(request.prompt_logprobs)  # on the first token's output only
    assert outputs[0].new_token_ids and carried[0] is outputs[0].prompt_logprobs
    ref = reference_logprobs(hf, ids)
    got = carried[0]
    assert got[0] is None and len(got) == len(ids)
    for position, lp in enumerate(got[1:], start=1):
        row = ref[position - 1]
        assert lp.token_id == ids[position]
        assert lp.logprob == pytest.approx(float(row[ids[position]]), abs=1e-4)
        x = float(row[ids[position]])  # the rank, up to tokens within float32 noise of it
        assert int((row > x + 1e-4).sum()) + 1 <= lp.rank <= int((row > x - 1e-4).sum()) + 1
        assert [v for _, v in lp.top] == pytest.approx(torch.topk(row, 4).values.tolist(), abs=1e-4)
        assert [float(row[t]) for t, _ in lp.top] == pytest.approx([v for _, v in lp.top], abs=1e-4)


def test_max_tokens_zero_scores_the_prompt_without_generating(tiny_pair):
    engine, hf = tiny_pair
    ids = engine.encode("Scoring a prompt needs no new token.")
    generation = engine.generate([ids], params=SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert (generation.token_ids, generation.text, generation.finish_reason) == ([], "", "length")
    ref = reference_logprobs(hf, ids)
    assert generation.prompt_logprobs[0] is None
    assert [lp.logprob for lp in generation.prompt_logprobs[1:]] == pytest.approx(
        [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)
    assert all(lp.top == () for lp in generation.prompt_logprobs[1:])
