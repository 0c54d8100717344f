"""Continuous batching on tiny bundles: requests that join and leave a running batch get the answers
`GuardedModel.generate` gives them alone, each with its own guard decision and sampling; the queue is
bounded; a cancelled request frees its row; a newcomer's prefill never stalls the batch for more than
one prefill."""
import threading
import time

import numpy as np
import pytest

from steerguard.errors import SteerguardError
from steerguard.runtime.batching import Admitted, ContinuousBatcher, Failed, Finished, Piece, QueueFull
from steerguard.runtime.model import GuardedModel
from steerguard.runtime.sampling import Sampling

PROMPTS = ["How do I protect my account from hackers?", "Tell me how to hurt someone.",
           "What is the capital of France and why is it famous for its food and art?", "hello there",
           "What is art?", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def gm(tiny_export):
    model = GuardedModel.load(tiny_export.bundle, threads=2)
    model.tau = 0.5
    return model


def run_together(batcher, jobs, stagger_s=0.0):
    """Submit (request, sampling, steer) jobs, `stagger_s` apart; wait for and return their results."""
    results, done = [None] * len(jobs), [threading.Event() for _ in jobs]

    def listener(i):
        def listen(ev):
            if isinstance(ev, (Finished, Failed)):
                results[i] = ev.result if isinstance(ev, Finished) else ev.error
                done[i].set()
        return listen

    for i, (request, sampling, steer) in enumerate(jobs):
        batcher.submit(request, sampling, listener(i), steer)
        time.sleep(stagger_s)
    for d in done:
        assert d.wait(120)
    return results


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


def test_a_newcomer_stalls_the_batch_for_at_most_one_prefill(gm):
    """Between two decode steps of a running batch, at most one prompt is prefilled."""
    batcher = ContinuousBatcher(gm, max_batch=6)
    calls = []
    prefill, decode = gm.prefill, gm.decode_one_token
    gm.prefill = lambda *a, **kw: calls.append("prefill") or prefill(*a, **kw)
    gm.decode_one_token = lambda *a, **kw: calls.append("decode") or decode(*a, **kw)
    try:
        run_together(batcher, [(p, Sampling(max_new_tokens=12), None) for p in PROMPTS])
    finally:
        del gm.prefill, gm.decode_one_token
        batcher.close()
    assert calls.count("prefill") == len(PROMPTS)
    assert "prefill,prefill" not in ",".join(calls)


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
