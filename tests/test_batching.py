"""Continuous batching on tiny bundles: requests that join and leave a running batch get the answers
`GuardedModel.generate` gives them alone, each with its own guard decision and sampling; the queue is
bounded; a cancelled request frees its row; a newcomer's prefill never stalls the batch for more than
one prefill."""
import threading
import time

import numpy as np
import pytest

from conftest import MIXED_PROMPTS as PROMPTS, run_together
from steerguard.errors import SteerguardError
from steerguard.runtime.batching import Admitted, ContinuousBatcher, Finished, Piece, QueueFull
from steerguard.runtime.model import GuardedModel, KVCache
from steerguard.runtime.sampling import Sampling



@pytest.fixture(scope="module")
def gm(tiny_export):
    model = GuardedModel.load(tiny_export.bundle, threads=2)
    model.tau = 0.5
    return model


def test_greedy_answers_joining_and_leaving_a_batch_equal_generate(gm):
    jobs = [(p, Sampling(max_new_tokens=40 - 5 * i), None) for i, p in enumerate(PROMPTS)]
    batcher = ContinuousBatcher(gm, max_batch=3, max_queue=16)
    try:
        results = run_together(batcher, jobs)
        assert batcher.peak_rows == 3 and batcher.active == 0 and batcher.queued == 0
    finally:
        batcher.close()
    for (prompt, sampling, _), got in zip(jobs, results):
        alone = gm.generate(prompt, sampling)
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.finish_reason == alone.finish_reason and got.risk == alone.risk and got.fired == alone.fired


def test_each_row_keeps_its_own_guard_decision_and_head(gm):
    """Refused and plain requests decode in one batch; each matches generate with the same head."""
    jobs = [(p, Sampling(max_new_tokens=12), steer) for p, steer in zip(PROMPTS, [True, False, True, None, False])]
    batcher = ContinuousBatcher(gm, max_batch=4)
    try:
        results = run_together(batcher, jobs)
    finally:
        batcher.close()
    for (prompt, sampling, steer), got in zip(jobs, results):
        alone = gm.generate(prompt, sampling, steer=steer)
        assert got.token_ids == alone.token_ids and got.fired == alone.fired
        assert got.token_ids or not got.fired, "a refusal is never empty"


def test_chat_messages_and_stop_strings(gm):
    full = gm.generate(PROMPTS[0], Sampling(max_new_tokens=12)).text
    stop = full.split()[len(full.split()) // 2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]
    jobs = [(PROMPTS[0], Sampling(max_new_tokens=12, stop=(stop,)), None), (messages, Sampling(max_new_tokens=9), None)]
    batcher = ContinuousBatcher(gm, max_batch=2)
    try:
        results = run_together(batcher, jobs)
    finally:
        batcher.close()
    assert results[0].finish_reason == "stop_string" and results[0].text == gm.generate(*jobs[0][:2]).text
    assert stop not in results[0].text
    assert results[1].token_ids == gm.generate(messages, jobs[1][1]).token_ids


def test_events_stream_the_text_in_order_and_never_show_a_stop_string(gm):
    full = gm.generate(PROMPTS[2], Sampling(max_new_tokens=16)).text
    stop = full.split()[-3]
    events, done = [], threading.Event()

    def listen(ev):
        events.append(ev)
        if isinstance(ev, Finished):
            done.set()

    batcher = ContinuousBatcher(gm, max_batch=2)
    try:
        batcher.submit(PROMPTS[2], Sampling(max_new_tokens=16, stop=(stop,)), listen)
        assert done.wait(60)
    finally:
        batcher.close()
    assert isinstance(events[0], Admitted) and isinstance(events[-1], Finished)
    pieces = [e.text for e in events if isinstance(e, Piece)]
    assert "".join(pieces) == events[-1].result.text and all(stop not in p for p in pieces)


def test_sampled_answers_are_seeded_per_request(gm):
    def sampled(seed):
        return Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed)

    batcher = ContinuousBatcher(gm, max_batch=4)
    try:
        a = run_together(batcher, [(PROMPTS[0], sampled(1), None), (PROMPTS[0], sampled(2), None),
                                   (PROMPTS[3], Sampling(max_new_tokens=10), None)])
        b = run_together(batcher, [(PROMPTS[0], sampled(1), None)])
    finally:
        batcher.close()
    assert a[0].token_ids == b[0].token_ids == gm.generate(PROMPTS[0], sampled(1)).token_ids
    assert a[2].token_ids == gm.generate(PROMPTS[3], Sampling(max_new_tokens=10)).token_ids


def test_score_is_the_guards_risk(gm):
    batcher = ContinuousBatcher(gm, max_batch=1)
    try:
        for p in PROMPTS[:3]:
            scored = batcher.score(p)
            assert scored.risk == gm.score(p) and scored.fired == gm.decide(scored.risk)
    finally:
        batcher.close()


def test_the_queue_is_bounded(gm):
    batcher = ContinuousBatcher(gm, max_batch=1, max_queue=2)
    long = Sampling(max_new_tokens=200, ignore_eos=True)
    tickets = []
    try:
        with pytest.raises(QueueFull) as full:
            for _ in range(10):
                tickets.append(batcher.submit(PROMPTS[3], long, lambda ev: None))
        assert 2 <= len(tickets) <= 3 and batcher.queued <= 2 and full.value.retry_after_s >= 1
    finally:
        for t in tickets:
            t.cancel()
        batcher.close()


def test_a_cancelled_request_frees_its_row_and_the_others_go_on(gm):
    batcher = ContinuousBatcher(gm, max_batch=3)
    started = threading.Event()

    def listen(ev):
        if isinstance(ev, Piece):
            started.set()

    try:
        doomed = batcher.submit(PROMPTS[1], Sampling(max_new_tokens=200, ignore_eos=True), listen)
        keep, results = [(p, Sampling(max_new_tokens=20), None) for p in PROMPTS[2:4]], {}
        runner = threading.Thread(target=lambda: results.update(got=run_together(batcher, keep)))
        runner.start()
        assert started.wait(30)
        doomed.cancel()
        runner.join(60)
        deadline = time.time() + 10
        while batcher.active and time.time() < deadline:
            time.sleep(0.01)
        assert batcher.active == 0 and not batcher.cache.lengths.any()
    finally:
        batcher.close()
    for (prompt, sampling, _), got in zip(keep, results["got"]):
        assert got.token_ids == gm.generate(prompt, sampling).token_ids


def spy_prefills(gm, batcher):
    """Record the engine work of a batcher in order: ("prefill", tokens computed) per prefill run (one
    prompt, or several in one batched run) and ("decode", rows) per decode step."""
    calls = []
    prefill, prefill_batch, decode = gm.prefill, gm.prefill_batch, gm.decode_one_token

    def one(prompt, cache, row, decoders=None, prefix=None):
        reused = prefix.reusable(prompt) if prefix is not None else 0
        calls.append(("prefill", len(prompt.ids) - reused))
        return prefill(prompt, cache, row, decoders, prefix)

    def batch(prompts, cache, first_row):
        calls.append(("prefill", sum(len(p.ids) for p in prompts)))
        return prefill_batch(prompts, cache, first_row)

    gm.prefill, gm.prefill_batch = one, batch
    gm.decode_one_token = lambda tokens, *a, **kw: calls.append(("decode", len(tokens))) or decode(tokens, *a, **kw)
    return calls


def unspy(gm):
    del gm.prefill, gm.prefill_batch, gm.decode_one_token


def prefills_between_decode_steps(calls) -> list[list[int]]:
    """The tokens of each prefill run, grouped by the token boundary they ran at."""
    groups, current = [], []
    for kind, n in calls:
        if kind == "prefill":
            current.append(n)
        elif current:
            groups.append(current)
            current = []
    return groups + ([current] if current else [])


@pytest.mark.parametrize("budget", [1, 24])
def test_a_newcomer_stalls_the_batch_for_at_most_one_prefill(gm, budget):
    """Between two decode steps of a running batch, the prompts prefilled compute at most `prefill_tokens`
    tokens together, or are one prompt (however long)."""
    batcher = ContinuousBatcher(gm, max_batch=6, prefill_tokens=budget)
    calls = spy_prefills(gm, batcher)
    try:
        run_together(batcher, [(p, Sampling(max_new_tokens=12), None) for p in PROMPTS])
    finally:
        unspy(gm)
        batcher.close()
    groups = prefills_between_decode_steps(calls)
    assert sum(len(g) for g in groups) == len(PROMPTS)
    assert all(len(g) == 1 or sum(g) <= budget for g in groups)
    if budget == 1:
        assert all(len(g) == 1 for g in groups)


def test_the_template_prefix_is_reused_and_prefill_gives_the_same_state(gm):
    """A prefill from the template prefix's KV leaves the row's cache, its last hidden state and its risk
    exactly as a whole prefill does, and computes only the tokens after the prefix."""
    batcher = ContinuousBatcher(gm, max_batch=2)
    prefix = batcher.prefix
    batcher.close()
    assert prefix is not None and prefix.ids == gm.tokenizer.prompt_prefix and len(prefix.ids) >= 2
    whole, reused = (KVCache(range(gm.num_layers), 1, gm.kv_heads, 64, gm.head_dim) for _ in range(2))
    for text in PROMPTS[:3]:
        prompt = gm.prepare(text)
        assert 0 < prefix.reusable(prompt) <= prompt.user_start
        h1, r1 = gm.prefill(prompt, whole, 0)
        h2, r2 = gm.prefill(prompt, reused, 0, prefix=prefix)
        assert np.array_equal(h1, h2) and r1 == r2
        n = len(prompt.ids)
        assert all(np.array_equal(whole.buffers[k][:, :, :n], reused.buffers[k][:, :, :n]) for k in whole.buffers)
    other = gm.prepare([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}])
    assert prefix.reusable(other) < len(prefix.ids)    # a prompt with its own system turn shares less


def test_a_batched_prefill_gives_each_row_what_it_gets_alone(gm):
    """Prompts of different lengths in one padded run: each row's cache, last hidden state and risk are
    exactly those of its own prefill."""
    prompts = [gm.prepare(p) for p in PROMPTS]
    assert len({len(p.ids) for p in prompts}) > 1 and gm.can_prefill_together(prompts)
    alone = KVCache(range(gm.num_layers), 1, gm.kv_heads, 64, gm.head_dim)
    together = KVCache(range(gm.num_layers), len(prompts) + 1, gm.kv_heads, 64, gm.head_dim)
    hidden, risks = gm.prefill_batch(prompts, together, 1)
    assert together.lengths[0] == 0
    for i, p in enumerate(prompts):
        h, r = gm.prefill(p, alone, 0)
        n = len(p.ids)
        assert np.array_equal(hidden[i], h) and risks[i] == r and together.lengths[i + 1] == n
        assert all(np.array_equal(together.buffers[k][i + 1, :, :n], alone.buffers[k][0, :, :n]) for k in alone.buffers)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_a_burst_is_admitted_together_and_answers_equal_generate(gm, prefix_cache):
    """Requests waiting at one boundary are prefilled together (one batched run without the prefix cache);
    greedy and refused answers still equal generate's."""
    steers = [None, True, None, False, None, None]
    jobs = [(p, Sampling(max_new_tokens=14 - i), steer) for i, (p, steer) in enumerate(zip(PROMPTS, steers))]
    batcher = ContinuousBatcher(gm, max_batch=8, prefill_tokens=1000, prefix_cache=prefix_cache)

    def hold_the_worker(ev):   # the listener runs on the worker: the burst queues up meanwhile
        time.sleep(0.3)

    batcher.submit(PROMPTS[3], Sampling(max_new_tokens=1), hold_the_worker)
    calls = spy_prefills(gm, batcher)
    try:
        results = run_together(batcher, jobs)
    finally:
        unspy(gm)
        batcher.close()
    groups = prefills_between_decode_steps(calls)
    if prefix_cache:
        assert max(len(g) for g in groups) >= 2
    else:
        assert max(n for g in groups for n in g) > max(len(gm.encode(p)) for p in PROMPTS), "no batched prefill ran"
    for (prompt, sampling, steer), got in zip(jobs, results):
        alone = gm.generate(prompt, sampling, steer=steer)
        assert got.token_ids == alone.token_ids and got.risk == alone.risk and got.fired == alone.fired


def test_bad_requests_are_clear_errors(gm):
    batcher = ContinuousBatcher(gm, max_batch=2, max_len=64)
    try:
        with pytest.raises(SteerguardError, match="64 tokens"):
            batcher.submit("word " * 40, Sampling(max_new_tokens=40), lambda ev: None)
        with pytest.raises(SteerguardError, match="max_new_tokens"):
            batcher.submit("hi", Sampling(max_new_tokens=0), lambda ev: None)
        with pytest.raises(SteerguardError, match="empty"):
            batcher.submit("  ", Sampling(), lambda ev: None)
    finally:
        batcher.close()
    with pytest.raises(SteerguardError, match="closed"):
        batcher.submit("hi", Sampling(max_new_tokens=4), lambda ev: None)
    with pytest.raises(SteerguardError):
        ContinuousBatcher(gm, max_batch=0)


def test_rows_beyond_the_ones_in_use_are_never_computed(gm):
    """A request alone in a batch of 8 rows decodes through a one-row view of the cache."""
    batcher = ContinuousBatcher(gm, max_batch=8)
    try:
        batcher.generate(PROMPTS[0], Sampling(max_new_tokens=5))
        assert list(batcher._steps) == [1] and batcher._steps[1][1].ids.shape == (1, 1)
    finally:
        batcher.close()
    assert np.all(batcher.cache.lengths == 0)
