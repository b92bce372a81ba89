"""The continuous engine's scheduler without a model: admission, slot reuse, prefix sharing, slot
compaction, prefill grouping and the out-of-memory back-off, on token ids a reader can count.

A fake chat template renders each message as [role id, its content's numbers..., END] and ends the
prompt with [ASSISTANT]; END is the stop id. A fake cache records the copies asked of it.
"""

from __future__ import annotations

import pytest

from runner.engines.continuous.scheduler import (
    MIN_SHARED_PREFIX,
    Phase,
    Scheduler,
)
from runner.engines.protocol import Reply, Request, Sampling, TurnError
from runner.inputs.conversation import Message

SYSTEM, END, USER, ASSISTANT = 1, 2, 3, 4
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class FakeText:
    """The chat template and tokenizer as the scheduler sees them, on numbers written as text."""

    stop_ids = frozenset({END})

    def __init__(self, context: int = 1000):
        self.context = context

    def prompt_ids(self, messages):
        ids = []
        for message in messages:
            ids += [ROLES[message.role], *map(int, message.content.split()), END]
        return [*ids, ASSISTANT]

    def overflow(self, prompt_tokens, max_new_tokens):
        if prompt_tokens + max_new_tokens <= self.context:
            return None
        return TurnError("context_overflow", "too long", {"prompt_tokens": prompt_tokens})

    def stop_string_in(self, generated, stops):
        return any(stop in words(generated) for stop in stops)

    def reply(self, request, prompt_tokens, new_ids, seconds, first):
        return Reply(words(new_ids), prompt_tokens, len(new_ids), "stop", seconds, first)


class FakeCache:
    """Records the copies asked of it, the slots it gives back and the sizes it is fitted to;
    holds rows x the longest need cells."""

    def __init__(self):
        self.copies, self.fits, self.forgotten, self.claims = [], [], [], []

    def copy(self, source, target, start, stop):
        self.copies.append((source, target, start, stop))

    def forget(self, slot, start=0):
        self.forgotten.append((slot, start))

    def fit(self, rows, length, most=None):
        self.fits.append((rows, length))

    def cells(self, needs):
        return len(needs) * max(needs)

    def claim(self, slots, stops):
        self.claims.append((list(slots), list(stops)))


def words(ids):
    return " ".join(map(str, ids))


def numbers(start, count):
    """A message text of `count` consecutive numbers from `start`."""
    return words(range(start, start + count))


def scheduler(batch_size=4, prefill_chunk=512, max_new_tokens=8, kv_budget=None, ragged=False):
    return Scheduler(
        FakeText(),
        FakeCache(),
        Sampling(max_new_tokens),
        batch_size,
        prefill_chunk,
        0,
        None,
        kv_budget,
        ragged=ragged,
    )


def turn(stream, *messages, continues=False, **sampling):
    """A request of (role, text) messages."""
    settings = Sampling(**{"max_new_tokens": 8, **sampling}) if sampling else None
    return Request(tuple(Message(*m) for m in messages), 0, stream, continues, settings)


def step(scheduler, replies):
    """One engine step without a model: admit, prefill one batch, decode; each decoding row
    samples the next token of replies[its stream]. Returns the finished turns."""
    finished = scheduler.admit()
    if batch := scheduler.prefill_batch():
        scheduler.prefilled(batch)
    if decode := scheduler.decode_batch():
        tokens = [replies[row.stream][len(row.generated)] for row in decode.decoding]
        finished += scheduler.update(decode, tokens, now=1.0)
    return finished


def run_until_answered(scheduler, replies, count=1):
    finished = []
    for _ in range(50):
        finished += step(scheduler, replies)
        if len(finished) >= count:
            return finished
    raise AssertionError("the turns did not finish")


def test_a_new_turn_prefills_all_but_its_last_prompt_token_and_decodes_from_it():
    s = scheduler()
    s.submit(turn(0, ("user", "10 11 12")))
    s.admit()
    batch = s.prefill_batch()
    assert (batch.input_ids, batch.starts, batch.slots, batch.chunks) == ([[3, 10, 11, 12, 2]], [0], [0], [5])
    s.prefilled(batch)
    decode = s.decode_batch()
    assert (decode.input_ids, decode.starts, decode.slots) == ([[ASSISTANT]], [5], slice(0, 1))
    [(request, reply)] = s.update(decode, [END], now=1.0)
    assert (request.stream, reply.text, reply.prompt_tokens, reply.new_tokens) == (0, "2", 6, 1)
    assert s.rows == [] and s.idle == {}  # no next turn: the slot is free at once


def test_a_conversations_next_turn_reuses_its_slot_and_prefills_only_the_new_tokens():
    s = scheduler(batch_size=2)
    s.submit(turn(0, ("user", "10 11 12"), continues=True))
    [(_, reply)] = run_until_answered(s, {0: [20, 21, END]})
    assert reply.text == "20 21 2"
    [row] = s.rows
    # The prompt, and every reply token but the last (never fed back).
    assert (row.phase, row.cached) == (Phase.idle, [3, 10, 11, 12, 2, 4, 20, 21])
    assert s.idle == {0: row} and s.free_slots() == 1

    s.submit(turn(0, ("user", "10 11 12"), ("assistant", "20 21"), ("user", "13 14")))
    assert s.free_slots() == 1  # a next turn has its slot already
    s.admit()
    assert s.rows == [row] and row.slot == 0 and s.idle == {}
    assert row.ids == [3, 10, 11, 12, 2, 4, 20, 21, 2, 3, 13, 14, 2, 4]
    batch = s.prefill_batch()
    assert (batch.input_ids, batch.starts, batch.slots) == ([[2, 3, 13, 14, 2]], [8], [0])
    assert s.stats == {
        "prefill_tokens": 6 + 6,
        "reused_tokens": 8,
        "shared_tokens": 0,
        "prefix_mismatches": 0,
        "kv_budget_waits": 0,
    }


def test_a_rewritten_history_keeps_only_the_matching_start():
    s = scheduler()
    s.submit(turn(0, ("user", "10 11 12"), continues=True))
    run_until_answered(s, {0: [20, 21, END]})
    s.submit(turn(0, ("user", "10 11 12"), ("assistant", "99"), ("user", "13")))
    s.admit()
    assert s.rows[0].cached == [3, 10, 11, 12, 2, 4]  # 20 21 were rendered as 99
    assert (s.stats["reused_tokens"], s.stats["prefix_mismatches"]) == (6, 1)


def test_a_shared_system_prompt_is_copied_from_the_slot_that_prefilled_it():
    system = ("system", numbers(100, 20))
    s = scheduler()
    s.submit(turn(0, system, ("user", "5")))
    s.submit(turn(1, system, ("user", "6")))
    s.admit()
    first, second = s.rows
    common = 1 + 20 + 1 + 1  # [SYSTEM, the 20 numbers, END, USER]: the user texts differ after it
    assert common >= MIN_SHARED_PREFIX
    assert (second.source, second.shared) == (first, common)  # waits while the first prefills it
    batch = s.prefill_batch()
    assert batch.rows == [first] and batch.chunks == [len(first.ids) - 1]
    s.prefilled(batch)
    s.update(s.decode_batch(), [7], now=1.0)

    batch = s.prefill_batch()  # the first slot holds the start now: copied, then the rest prefilled
    assert s.cache.copies == [(0, 1, 0, common)]
    assert second.cached == second.ids[:common] and second.source is None
    assert (batch.rows, batch.input_ids, batch.starts, batch.slots) == ([second], [[6, 2]], [common], [1])
    assert s.stats == {
        "prefill_tokens": 2 * len(first.ids) - common,
        "reused_tokens": 0,
        "shared_tokens": common,
        "prefix_mismatches": 0,
        "kv_budget_waits": 0,
    }


def test_a_prompt_whose_start_a_slot_already_holds_copies_it_at_admission():
    system = ("system", numbers(100, 20))
    s = scheduler()
    s.submit(turn(0, system, ("user", "5")))
    step(s, {0: [7, 8, 9]})
    s.submit(turn(1, system, ("user", "5")))  # the same prompt: a second sample
    s.admit()
    second = s.rows[1]
    prompt = len(second.ids)
    assert s.cache.copies == [(0, 1, 0, prompt - 1)]  # all but the token its first decode feeds
    assert (second.phase, second.remaining, s.stats["shared_tokens"]) == (Phase.decode, 0, prompt - 1)
    assert s.prefill_batch() is None


def test_a_row_waiting_for_a_source_that_is_released_prefills_its_prompt_itself():
    s = scheduler(batch_size=2, prefill_chunk=8)
    s.submit(turn(0, ("user", "10 11"), continues=True))
    run_until_answered(s, {0: [20, END]})
    waiter = s.rows[0]  # stream 0, idle: slot 0 holds [3, 10, 11, 2, 4, 20]
    second_turn = (("user", "10 11"), ("assistant", "20"), ("user", numbers(30, 20)))
    # Another sample of the conversation's second turn joins first, and prefills 8 tokens a step.
    s.submit(turn(1, *second_turn))
    step(s, {})
    source = s.rows[1]
    assert (source.phase, len(source.cached)) == (Phase.prefill, 8)

    s.submit(turn(0, *second_turn))
    s.admit()
    assert s.stats["reused_tokens"] == 6
    assert (waiter.source, waiter.shared) == (source, len(waiter.ids) - 1)
    # Out of memory: the source, admitted last, goes back to the queue and frees its slot.
    assert s.back_off() is None
    assert s.rows == [waiter] and [r.stream for r in s.queue] == [1]

    batch = s.prefill_batch()
    assert (waiter.source, waiter.shared) == (None, 0)
    assert (batch.rows, batch.starts, batch.chunks) == ([waiter], [6], [8])
    assert batch.input_ids == [waiter.ids[6:14]]
    assert s.cache.copies == [] and s.stats["shared_tokens"] == 0


def test_a_released_slot_takes_the_last_occupied_one_so_slots_stay_contiguous():
    s = scheduler()
    for stream, text in enumerate(["10 11", "20 21", "30 31"]):
        s.submit(turn(stream, ("user", text)))
    replies = {0: [END], 1: [40, 41, 42], 2: [50, 51, 52]}
    [(request, reply)] = step(s, replies)
    assert (request.stream, reply.text) == (0, "2")
    # Slot 2's row moved into slot 0, its KV with it: the prompt and the token just fed.
    assert s.cache.copies == [(2, 0, 0, 5)]
    # What slot 0 held past those 5 positions, and all of slot 2, give their memory back.
    assert s.cache.forgotten == [(0, 5), (2, 0)]
    assert [(row.stream, row.slot) for row in s.rows] == [(2, 0), (1, 1)]
    decode = s.decode_batch()
    assert (decode.input_ids, decode.starts) == ([[50], [40]], [5, 5])


def test_decoding_covers_the_slots_up_to_the_last_decoding_row():
    s = scheduler(prefill_chunk=6)
    s.submit(turn(0, ("user", "10")))  # 3 tokens to prefill
    s.submit(turn(1, ("user", numbers(20, 10))))  # 12 tokens to prefill: too wide to join them
    s.submit(turn(2, ("user", "30")))
    s.admit()
    batch = s.prefill_batch()  # the short prompts, of equal length, go together
    assert (batch.rows, batch.chunks) == ([s.rows[0], s.rows[2]], [3, 3])
    s.prefilled(batch)
    decode = s.decode_batch()
    assert [row.stream for row in decode.decoding] == [0, 2]
    assert decode.slots == slice(0, 3) and decode.logit_rows == [0, 2]
    assert decode.input_ids == [[ASSISTANT], [0], [ASSISTANT]]  # slot 1 still prefills: padding
    # Before each pass, the cache takes the memory of what it writes: the prefill's 3 tokens of
    # slots 0 and 2, then a token of slots 0-2 (slot 1 fed padding after none of its prompt).
    assert s.cache.claims == [([0, 2], [3, 3]), ([0, 1, 2], [4, 1, 4])]


def test_prefill_groups_rows_of_similar_length_under_the_chunk():
    s = scheduler(prefill_chunk=30)
    for stream, count in enumerate([8, 9, 20]):  # 10, 11 and 22 tokens to prefill
        s.submit(turn(stream, ("user", numbers(100 * (stream + 1), count))))
    s.admit()
    batch = s.prefill_batch()
    # Adding the 22-token prompt would pad to 3 x 22 = 66 tokens for 43 real ones (and pass 30).
    assert ([row.stream for row in batch.rows], batch.chunks) == ([0, 1], [10, 11])
    assert [len(ids) for ids in batch.input_ids] == [11, 11] and batch.input_ids[0][-1] == 0
    assert batch.tokens == 21


def test_a_ragged_prefill_takes_rows_of_any_length_unpadded_up_to_the_chunk():
    s = scheduler(prefill_chunk=45, ragged=True)
    for stream, count in enumerate([8, 20, 9, 14]):  # 10, 22, 11 and 16 tokens to prefill
        s.submit(turn(stream, ("user", numbers(100 * (stream + 1), count))))
    s.admit()
    batch = s.prefill_batch()
    # Shortest first while the chunk holds them: 10 + 11 + 16 = 37; the 22-token prompt would pass 45.
    assert ([row.stream for row in batch.rows], batch.chunks) == ([0, 2, 3], [10, 11, 16])
    assert [len(ids) for ids in batch.input_ids] == [10, 11, 16] and 0 not in batch.input_ids[0]
    s.prefilled(batch)
    assert [row.stream for row in s.prefill_batch().rows] == [1]


def test_a_failed_prefill_pass_is_undone_so_the_same_chunk_runs_again():
    s = scheduler(prefill_chunk=45, ragged=True)
    for stream, count in enumerate([8, 9]):
        s.submit(turn(stream, ("user", numbers(100 * (stream + 1), count))))
    s.admit()
    batch = s.prefill_batch()
    s.prefilled(batch)
    assert all(row.phase is Phase.decode for row in batch.rows)
    s.unprefilled(batch)
    assert all(row.phase is Phase.prefill and not row.cached for row in batch.rows)
    assert s.prefill_batch() == batch


def test_a_turn_ends_at_its_max_new_tokens_or_a_stop_string():
    s = scheduler()
    s.submit(turn(0, ("user", "10"), max_new_tokens=3))
    s.submit(turn(1, ("user", "11"), stop=("8 9",)))
    finished = run_until_answered(s, {0: [5, 6, 7, 8], 1: [7, 8, 9, 10]}, count=2)
    assert {request.stream: reply.text for request, reply in finished} == {0: "5 6 7", 1: "7 8 9"}


def test_a_prompt_over_the_context_ends_the_turn_and_frees_its_slot():
    s = scheduler()
    s.text.context = 20
    s.submit(turn(0, ("user", "10"), continues=True))
    run_until_answered(s, {0: [END]})
    s.submit(turn(0, ("user", numbers(10, 20))))
    [(request, error)] = s.admit()
    assert (request.stream, error.code, error.details) == (0, "context_overflow", {"prompt_tokens": 23})
    assert s.rows == [] and s.idle == {}


def test_out_of_memory_sends_the_newest_rows_back_and_halves_the_batch():
    s = scheduler(batch_size=4)
    requests = [turn(stream, ("user", str(10 + stream))) for stream in range(5)]
    for request in requests:
        s.submit(request)
    s.admit()
    assert [row.stream for row in s.rows] == [0, 1, 2, 3] and list(s.queue) == [requests[4]]

    assert s.back_off() is None
    assert s.batch_size == 2
    assert [row.stream for row in s.rows] == [0, 1]
    assert list(s.queue) == [requests[2], requests[3], requests[4]]  # they start again, in order
    assert s.cache.copies == []  # the last slots were freed: nothing moved
    assert s.cache.forgotten == [(3, 0), (2, 0)]
    assert s.free_slots() == 0


def test_out_of_memory_with_one_row_ends_its_turn():
    s = scheduler(batch_size=1)
    request = turn(0, ("user", "10"))
    s.submit(request)
    s.admit()
    lost, error = s.back_off()
    assert lost is request
    assert (error.code, error.message) == ("out_of_memory", "out of memory even at batch size 1")
    assert s.rows == [] and s.batch_size == 1
    with pytest.raises(RuntimeError, match="no turn in flight"):
        s.back_off()


def test_turns_join_only_while_the_kv_budget_allows_and_new_ones_queue_behind_a_waiting_turn():
    # A prompt of n numbers is n + 3 ids; a turn needs them and max_new_tokens (8) positions.
    s = scheduler(kv_budget=40)
    short, long, later = (
        turn(0, ("user", "10 11 12")),
        turn(1, ("user", numbers(10, 15))),
        turn(2, ("user", "13")),
    )
    for request in (short, long, later):
        s.submit(request)
    s.admit()
    # 2 rows x 26 positions would pass 40; the later short turn would fit but waits its turn.
    assert [row.stream for row in s.rows] == [0] and list(s.queue) == [long, later]
    assert s.cache.fits[-1] == (1, 14)
    run_until_answered(s, {0: [20, END]})
    s.admit()
    assert [row.stream for row in s.rows] == [1] and list(s.queue) == [later]
    run_until_answered(s, {1: [21, END]})
    s.admit()
    assert [row.stream for row in s.rows] == [2] and not s.queue
    assert s.stats["kv_budget_waits"] >= 2  # admissions (one a step) that left a turn waiting

    unlimited = scheduler()
    for request in (short, long, later):
        unlimited.submit(request)
    unlimited.admit()
    assert [row.stream for row in unlimited.rows] == [0, 1, 2]


def test_with_every_slot_idle_a_waiting_turn_takes_the_room_of_the_longest_idle_conversation():
    s = scheduler(kv_budget=40)
    s.submit(turn(0, ("user", "10 11 12"), continues=True))
    s.submit(turn(1, ("user", numbers(10, 6)), continues=True))
    run_until_answered(s, {0: [20, END], 1: [21, END]}, count=2)
    kept = s.idle[0]
    # Conversation 0's next turn needs 17 + 8 positions: two slots of that would pass 40.
    s.submit(turn(0, ("user", "10 11 12"), ("assistant", "20"), ("user", numbers(30, 6))))
    s.admit()
    assert s.rows == [kept] and kept.phase is Phase.prefill and s.idle == {}  # conversation 1 gave way
    assert kept.cached == [3, 10, 11, 12, 2, 4, 20]  # its own slot kept its first turn


def test_a_turn_over_the_kv_budget_alone_runs_alone(caplog):
    s = scheduler(kv_budget=10)
    s.submit(turn(0, ("user", "10 11 12")))
    s.submit(turn(1, ("user", "13")))
    s.admit()
    assert [row.stream for row in s.rows] == [0] and len(s.queue) == 1
    assert "more than the KV budget's 10; it runs alone" in caplog.text


def test_a_sampling_turn_gets_its_generator_from_the_engine():
    made = []
    s = Scheduler(FakeText(), FakeCache(), Sampling(4), 2, 512, 0, lambda r: made.append(r) or "generator")
    sampled, greedy = turn(0, ("user", "10"), do_sample=True), turn(1, ("user", "11"))
    s.submit(sampled)
    s.submit(greedy)
    s.admit()
    assert [row.generator for row in s.rows] == ["generator", None] and made == [sampled]
