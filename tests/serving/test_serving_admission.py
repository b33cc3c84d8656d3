"""The ingress's admission gate in-process: what it refuses without asking the scheduler."""

from grokserve.serving.admission import AdmissionGate, Refusal

FULL = Refusal("the request queue is full (maxQueuedRequests=8); retry later", "rate_limit", 2)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def forwarded(gate):
    """Whether the next request goes to the scheduler (taking a pass if the gate is closed)."""
    _, refusal = gate.check()
    return refusal is None


def test_an_open_gate_forwards_everything_without_passes():
    gate = AdmissionGate(Clock())
    assert gate.check() == (False, None)
    gate.admitted()
    gate.finished()
    assert all(forwarded(gate) for _ in range(100))


def test_after_full_it_repeats_the_refusal_until_a_slot_frees():
    gate = AdmissionGate(Clock())
    gate.refused(FULL)
    assert [gate.check() for _ in range(3)] == [(False, FULL)] * 3
    gate.finished()  # an admitted request ended: one request may ask the scheduler
    assert gate.check() == (True, None)
    assert gate.check() == (False, FULL)


def test_admissions_open_it_up_and_a_refusal_closes_it_again():
    gate = AdmissionGate(Clock())
    gate.refused(FULL)
    gate.finished()
    assert gate.check() == (True, None)
    gate.admitted()  # there was room: two more may ask, then four
    assert [forwarded(gate) for _ in range(3)] == [True, True, False]
    gate.admitted()
    gate.admitted()
    assert sum(forwarded(gate) for _ in range(10)) == 4
    gate.refused(FULL)
    assert not forwarded(gate)


def test_a_pass_without_an_answer_is_given_back():
    gate = AdmissionGate(Clock())
    gate.refused(FULL)
    gate.finished()
    assert gate.check() == (True, None)
    gate.give_back()  # e.g. the request was invalid (400): the next one may ask instead
    assert gate.check() == (True, None)
    assert not forwarded(gate)


def test_a_closed_gate_asks_again_after_the_retry_after_it_answered():
    clock = Clock()
    gate = AdmissionGate(clock)
    gate.refused(FULL)
    clock.now += FULL.retry_after - 0.1
    assert not forwarded(gate)
    clock.now += 0.1
    assert gate.check() == (True, None), "nothing seen for Retry-After: one request asks"
    assert not forwarded(gate)
    clock.now += FULL.retry_after
    assert forwarded(gate)
