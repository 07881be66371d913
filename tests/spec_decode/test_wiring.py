"""Wiring without an engine: which vLLM configs get the adaptive scheduler, the pin file's grammar, the cost
ratio read from the model config."""

from __future__ import annotations

import time
import types

import pytest

from vllm_frontier.spec_decode import FIXED_SCHEDULER_CLS, SCHEDULER_CLS, WORKER_CLS, update_vllm_config, worker_cls


def fake_config(method="mtp", scheduler_cls=None, async_scheduling=False,
                worker_cls="vllm.v1.worker.cpu_worker.CPUWorker", dp=1, backend="mp"):
    spec = None if method is None else types.SimpleNamespace(method=method, num_speculative_tokens=3)
    sched = types.SimpleNamespace(scheduler_cls=scheduler_cls, async_scheduling=async_scheduling)
    parallel = types.SimpleNamespace(worker_cls=worker_cls, data_parallel_size=dp,
                                     distributed_executor_backend=backend)
    return types.SimpleNamespace(speculative_config=spec, scheduler_config=sched, parallel_config=parallel)


def test_update_vllm_config_installs_the_adaptive_scheduler_and_skipping_worker_for_mtp_only():
    cfg = fake_config()
    assert update_vllm_config(cfg) and cfg.scheduler_config.scheduler_cls == SCHEDULER_CLS
    assert cfg.parallel_config.worker_cls == WORKER_CLS["cpu"]
    cfg = fake_config(worker_cls="vllm.v1.worker.gpu_worker.Worker")
    assert update_vllm_config(cfg) and cfg.parallel_config.worker_cls == WORKER_CLS["gpu"]
    # a user-chosen scheduler stays, the worker is still installed (vLLM's own table can ask for k = 0)
    cfg = fake_config(scheduler_cls=FIXED_SCHEDULER_CLS)
    assert not update_vllm_config(cfg) and cfg.scheduler_config.scheduler_cls == FIXED_SCHEDULER_CLS
    assert cfg.parallel_config.worker_cls == WORKER_CLS["cpu"]
    # someone else's worker class stays
    cfg = fake_config(worker_cls="my.pkg.Worker")
    assert update_vllm_config(cfg) and cfg.parallel_config.worker_cls == "my.pkg.Worker"
    for cfg in (fake_config(method=None), fake_config(method="ngram"), fake_config(async_scheduling=True)):
        before = (cfg.scheduler_config.scheduler_cls, cfg.parallel_config.worker_cls,
                  cfg.parallel_config.distributed_executor_backend)
        assert not update_vllm_config(cfg)
        assert (cfg.scheduler_config.scheduler_cls, cfg.parallel_config.worker_cls,
                cfg.parallel_config.distributed_executor_backend) == before


def test_update_vllm_config_replaces_only_vllms_multiprocess_executor():
    from vllm_frontier.spec_decode.executor import EXECUTOR_CLS

    cfg = fake_config()
    update_vllm_config(cfg)
    assert cfg.parallel_config.distributed_executor_backend == EXECUTOR_CLS
    for other in ("uni", "ray", "my.pkg.Executor", EXECUTOR_CLS):
        cfg = fake_config(backend=other)
        update_vllm_config(cfg)
        assert cfg.parallel_config.distributed_executor_backend == other


def test_worker_cls_maps_vllm_workers_and_auto_by_platform():
    assert worker_cls("vllm.v1.worker.cpu_worker.CPUWorker") == WORKER_CLS["cpu"]
    assert worker_cls("vllm.v1.worker.gpu_worker.Worker") == WORKER_CLS["gpu"]
    assert worker_cls(WORKER_CLS["cpu"]) == WORKER_CLS["cpu"]
    assert worker_cls("my.pkg.Worker") is None
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        assert worker_cls("auto") == WORKER_CLS["cpu"]


def test_worker_classes_extend_vllm_workers():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_frontier.spec_decode.scheduler import drafter_skips

    assert issubclass(resolve_obj_by_qualname(WORKER_CLS["cpu"]), CPUWorker)
    assert issubclass(resolve_obj_by_qualname(WORKER_CLS["gpu"]), Worker)
    assert drafter_skips(fake_config(worker_cls=WORKER_CLS["cpu"]))
    assert not drafter_skips(fake_config(worker_cls=WORKER_CLS["cpu"], dp=2))
    assert not drafter_skips(fake_config())


def test_scheduler_classes_import_and_resolve_by_path():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_frontier.spec_decode.scheduler import AdaptiveDraftScheduler, PinnedDraftScheduler

    assert resolve_obj_by_qualname(SCHEDULER_CLS) is AdaptiveDraftScheduler
    assert issubclass(PinnedDraftScheduler, AdaptiveDraftScheduler) and issubclass(AdaptiveDraftScheduler, Scheduler)
    assert resolve_obj_by_qualname(FIXED_SCHEDULER_CLS) is Scheduler


def test_pin_file_grammar(tmp_path, monkeypatch):
    from vllm_frontier.spec_decode.scheduler import PinnedDraftScheduler

    s = PinnedDraftScheduler.__new__(PinnedDraftScheduler)  # the parser needs only these fields
    s.num_spec_tokens = 3
    s._pin_path = str(tmp_path / "pin")
    s._pin, s._pin_read_at = None, -1e9
    s._after_idle, s._request_pinned, s.waiting, s.running = False, False, [], []
    assert s.pinned() is None  # no file: adaptive
    for text, want in [("adaptive", None), ("", None), ("2", [2]), ("3,0,1", [3, 0, 1]), ("9,-1", [3, 0])]:
        (tmp_path / "pin").write_text(text)
        s._pin_read_at = -1e9   # the last read aged past pin_check_every
        assert s.pinned() == want
    # between reads no system call at all (each would release the GIL in the engine core's step loop)
    calls = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **kw: calls.append(a) or real_open(*a, **kw))
    (tmp_path / "pin").write_text("1")
    s._pin_read_at = time.monotonic() + 100.0   # a fresh read
    assert s.pinned() == [3, 0] and s.pinned() == [3, 0] and not calls
    s._pin_read_at = time.monotonic() - 2 * s.pin_check_every
    assert s.pinned() == [1] and len(calls) == 1
    monkeypatch.undo()
    (tmp_path / "pin").write_text("fast")
    s._pin_read_at = -1e9
    with pytest.raises(ValueError, match="comma-separated cycle"):
        s.pinned()


def test_pin_is_read_at_the_first_step_after_idle_and_rarely_while_busy(tmp_path, monkeypatch):
    from vllm_frontier.spec_decode.scheduler import PinnedDraftScheduler

    s = PinnedDraftScheduler.__new__(PinnedDraftScheduler)
    s.num_spec_tokens = 3
    s._pin_path = str(tmp_path / "pin")
    s._pin, s._pin_read_at = None, -1e9
    s._after_idle, s._request_pinned, s.waiting, s.running = False, False, [], []
    (tmp_path / "pin").write_text("2")
    assert s.pinned() == [2]
    (tmp_path / "pin").write_text("0")   # written while busy: not seen before pin_check_every has passed
    assert s.pinned() == [2]
    s.became_idle()                      # the engine's last request finished: the next step reads the file
    assert s.pinned() == [0]
    assert PinnedDraftScheduler.pin_check_every >= 0.1   # a busy engine reads it every few dozen steps at most


def test_a_pin_carried_by_the_requests_holds_for_their_busy_period_without_any_file_read(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vllm_frontier.spec_decode.scheduler import REQUEST_PIN_KEY, PinnedDraftScheduler

    def request(pin=None):
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args={REQUEST_PIN_KEY: pin} if pin else None))

    s = PinnedDraftScheduler.__new__(PinnedDraftScheduler)
    s.num_spec_tokens = 3
    s._pin_path = str(tmp_path / "pin")
    (tmp_path / "pin").write_text("3")
    s._pin, s._pin_read_at, s._after_idle, s._request_pinned = None, -1e9, True, False
    s.waiting, s.running = [request(), request("1,0")], []
    calls = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **kw: calls.append(a) or real_open(*a, **kw))
    assert s.pinned() == [1, 0]
    s._pin_read_at = -1e9   # a file read would be due now: the request pin still holds, no read
    assert s.pinned() == [1, 0] and not calls
    s.became_idle()
    s.waiting = [request("adaptive")]
    assert s.pinned() is None and not calls   # "adaptive" from a request: the rule, still no file read
    s.became_idle()
    s.waiting = [request()]                   # no request pin: back to the file
    assert s.pinned() == [3] and len(calls) == 1
    monkeypatch.undo()
    s.became_idle()
    s.waiting = [request("fast")]
    with pytest.raises(ValueError, match="request pin"):
        s.pinned()


def test_pinned_steps_are_not_the_rules_time():
    """Probe intervals and the acceptance window count the rule's own steps: a long pinned stretch (another
    benchmark mode) neither makes a probe due at once when the rule takes over again nor ages its window."""
    from vllm_frontier.spec_decode.policy import DraftLengthPolicy, PolicyConfig
    from vllm_frontier.spec_decode.scheduler import PinnedDraftScheduler

    def scheduler(pinned_stretch: int) -> list:
        s = PinnedDraftScheduler.__new__(PinnedDraftScheduler)
        s._policy = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.25))
        s._rule_step, s._is_pinned, s._skips = 0, False, False
        got = [s.probe_k(0) for _ in range(100)]
        s._is_pinned = True
        assert all(s.probe_k(0) is None for _ in range(pinned_stretch))   # pinned: no exploration
        s._is_pinned = False
        return got + [s.probe_k(0) for _ in range(3000)]

    plain, with_pins = scheduler(0), scheduler(5000)
    assert plain.count(1) >= 2   # the rule probes now and then
    assert with_pins == plain    # the same probes at the same rule steps: pinned steps are not its time


def fake_step(scheduled: dict, spec: dict, sampled: dict, k: int):
    so = types.SimpleNamespace(num_scheduled_tokens=scheduled, scheduled_spec_decode_tokens=spec,
                               total_num_scheduled_tokens=sum(scheduled.values()), num_spec_tokens_to_schedule=k)
    rows = list(sampled)
    mo = types.SimpleNamespace(req_id_to_index={r: i for i, r in enumerate(rows)},
                               sampled_token_ids=[sampled[r] for r in rows])
    return so, mo


def test_step_counters_of_plain_and_drafting_steps():
    from vllm_frontier.spec_decode.policy import DraftLengthPolicy, PolicyConfig
    from vllm_frontier.spec_decode.scheduler import AdaptiveDraftScheduler

    s = AdaptiveDraftScheduler.__new__(AdaptiveDraftScheduler)
    s.num_spec_tokens = 3
    s._policy = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.25))
    s._rule_step, s._verify_run, s._stale = 5, 1, False
    s._counts = {"steps": 0, "decode_request_steps": 0, "decode_tokens": 0, "reached_per_pos": [0] * 3,
                 "accepted_per_pos": [0] * 3, "draft_tokens_verified": 0,
                 "run_reached_per_pos": [[0] * 3 for _ in range(4)],
                 "run_accepted_per_pos": [[0] * 3 for _ in range(4)]}
    req = lambda n_out: types.SimpleNamespace(num_output_tokens=n_out)   # noqa: E731
    s.requests = {"a": req(4), "b": req(0), "c": req(7), "d": req(2)}
    # k = 0: a, c decode one token each; b gets its first token after a 6-token prompt; d is a partial chunk
    s._observe(*fake_step({"a": 1, "b": 6, "c": 1, "d": 3}, {}, {"a": [11], "b": [12], "c": [13], "d": []}, 0))
    c = s._counts
    assert (c["steps"], c["decode_request_steps"], c["decode_tokens"], c["draft_tokens_verified"]) == (1, 2, 2, 0)
    # k = 2: a accepts both drafts (3 tokens), c none (1 token)
    s._observe(*fake_step({"a": 3, "c": 3}, {"a": [5, 6], "c": [7, 8]}, {"a": [5, 6, 9], "c": [1]}, 2))
    assert (c["steps"], c["decode_request_steps"], c["decode_tokens"], c["draft_tokens_verified"]) == (2, 4, 6, 4)
    assert c["reached_per_pos"] == [2, 1, 0] and c["accepted_per_pos"] == [1, 1, 0]
    assert s._stale and s._policy.window.reached == [2, 1, 0]


def test_draft_cost_ratio_from_the_model_config():
    from vllm_frontier.spec_decode.scheduler import draft_cost_ratio

    assert draft_cost_ratio(types.SimpleNamespace(num_hidden_layers=4)) == 0.25
    assert draft_cost_ratio(types.SimpleNamespace(num_hidden_layers=61)) == pytest.approx(1 / 61)


def test_mtp_pays_says_why_per_device():
    from vllm_frontier.spec_decode.device import mtp_pays

    on, why = mtp_pays("cpu")
    assert not on and "no draft length beats no speculation" in why and "--plugin mtp" in why
    on, why = mtp_pays("cuda")
    assert on and why
    on, why = mtp_pays("xpu")
    assert not on and "xpu" in why
    assert isinstance(mtp_pays()[0], bool)   # the current platform


class FakeRequest:
    """A decoding request for the scheduler without an engine: its last sampled token is not computed yet."""

    def __init__(self, request_id: str, num_computed_tokens: int, num_output_tokens: int = 5):
        self.request_id, self.num_computed_tokens = request_id, num_computed_tokens
        self.num_output_tokens, self.spec_token_ids = num_output_tokens, []

    @property
    def num_tokens(self) -> int:
        return self.num_computed_tokens + 1


def quiet_scheduler(monkeypatch, quiet: bool = True):
    """An `AdaptiveDraftScheduler` without an engine whose rule measured vLLM CPU's shape (F = 10 token units,
    each drafted position D = 30: drafting cannot pay even at full acceptance), and a step function: 8 decoding
    requests per step, a drafting step taking 3x a plain one on a fake clock. ``step(running)`` schedules one
    step with the given running requests (default: 8 requests of 5 computed tokens)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_frontier.spec_decode import scheduler as sched_mod
    from vllm_frontier.spec_decode.policy import DraftLengthPolicy, PolicyConfig

    clock = [0.0]
    monkeypatch.setattr(sched_mod.time, "perf_counter", lambda: clock[0])

    def fake_schedule(self, *args, **kwargs):
        k = self.dynamic_sd_lookup[len(self.running)]
        clock[0] += 0.010 * (3 if k else 1)
        for r in self.running:
            r.num_computed_tokens += 1 + k
        return types.SimpleNamespace(num_scheduled_tokens={r.request_id: 1 for r in self.running},
                                     scheduled_spec_decode_tokens={}, total_num_scheduled_tokens=8,
                                     num_spec_tokens_to_schedule=k)

    monkeypatch.setattr(Scheduler, "schedule", fake_schedule)
    s = sched_mod.AdaptiveDraftScheduler.__new__(sched_mod.AdaptiveDraftScheduler)
    s.num_spec_tokens, s.max_num_running_reqs, s._skips = 3, 8, True
    s._policy = DraftLengthPolicy(PolicyConfig(max_k=3, draft_cost=0.25, drafter_skips=True))
    for k in (0, 1):
        for b in (1, 2, 4, 8) * 8:
            u = s._policy.units(b, k)
            s._policy.cost.observe(u, 1e-3 * (10.0 + 30.0 * k + u), k=k)
    s._table = s._policy.table(8)
    s.dynamic_sd_lookup = s._table
    s._step = s._rule_step = s._refreshed_at = s._run = s._verify_run = 0
    s._may_hold_drafts = True
    s._stale, s._pending, s._quiet_until, s._drafted_upto = False, None, 0, {}
    s._counts = {"k_histogram": [0] * 4, "quiet_steps": 0}
    s.waiting = []
    default = [FakeRequest(f"r{i}", 5) for i in range(8)]
    if not quiet:
        s.quiet_until = lambda: 0

    def step(running=None) -> int:
        if running is None:
            for r in default:
                r.num_computed_tokens = 5
        s.running = default if running is None else running
        s.requests = {r.request_id: r for r in s.running}
        return s.schedule().num_spec_tokens_to_schedule

    return s, step


def test_a_quiet_rule_skips_its_per_step_work_and_decides_as_before(monkeypatch):
    """Where drafting cannot pay even at full acceptance, the rule skips timing, table refreshes and probe
    checks between its probes, and chooses the same k at every step as the rule that does all of it."""

    def run(quiet: bool, steps: int = 9000):
        s, step = quiet_scheduler(monkeypatch, quiet)
        timed, refreshes = [0], [0]
        observe, choose = s._policy.observe_step, s.choose_table
        s._policy.observe_step = lambda *a: (timed.__setitem__(0, timed[0] + 1), observe(*a))[1]
        s.choose_table = lambda: (refreshes.__setitem__(0, refreshes[0] + 1), choose())[1]
        ks = [step() for _ in range(steps)]
        return ks, timed[0], refreshes[0], s._counts["quiet_steps"]

    ks_all, timed_all, refreshes_all, quiet_all = run(quiet=False)
    ks, timed, refreshes, quiet_steps = run(quiet=True)
    assert ks == ks_all                                   # the same k at every step
    assert [i + 1 for i, k in enumerate(ks) if k] == [4096, 4097, 8192, 8193]   # the probes, as before
    assert quiet_all == 0 and timed_all == 8999 and refreshes_all > 500
    # quiet: timed only from 32 steps before each probe to the refresh after it; a handful of refreshes
    assert quiet_steps > 8500 and timed < 300 and refreshes < 40


def batches_of(period: int, prompt: int = 6):
    """Running requests of a benchmark-like workload: a new batch of 8 requests every ``period`` steps, each
    with ``prompt`` tokens computed when it starts. Returns running(step) (step from 1)."""
    made: dict[int, list] = {}

    def running(step: int) -> list:
        g = (step - 1) // period
        if g not in made:
            made.clear()
            made[g] = [FakeRequest(f"g{g}r{i}", prompt, num_output_tokens=1) for i in range(8)]
        return made[g]

    return running


def test_a_due_probe_waits_for_young_requests_and_replays_few_positions(monkeypatch):
    """The probe's first step replays every position the running requests skipped: a due probe waits for a step
    where they are few (new requests), at most half its interval."""
    s, step = quiet_scheduler(monkeypatch)
    running = batches_of(100)
    replays = {}
    ks = []
    for i in range(1, 9001):
        batch = running(i)
        s.running = batch
        replays[i] = s.replay_per_request()
        ks.append(step(batch))
    probes = [i + 1 for i, k in enumerate(ks) if k]
    # due at 4096 (requests 95 steps old: 102 positions each) -> the next batch's first step, 4101; due again
    # 4096 steps later, at 8197 (96 steps old) -> 8201
    assert probes == [4101, 4102, 8201, 8202]
    assert replays[4096] == 102 and replays[4101] == 7 and replays[8197] == 103 and replays[8201] == 7
    # the drafter caught up with the probed requests: 6 prompt tokens + 2 per k = 1 step
    assert s._drafted_upto == {f"g82r{i}": 10 for i in range(8)}


def test_a_due_probe_waits_at_most_half_its_interval(monkeypatch):
    s, step = quiet_scheduler(monkeypatch)
    old = [FakeRequest(f"r{i}", 500) for i in range(8)]   # long-lived requests
    ks = [step(old) for _ in range(9000)]
    assert [i + 1 for i, k in enumerate(ks) if k] == [4096 + 2048, 4096 + 2049]


def test_replay_per_request_counts_positions_since_the_last_drafting_step():
    from vllm_frontier.spec_decode.scheduler import AdaptiveDraftScheduler

    s = AdaptiveDraftScheduler.__new__(AdaptiveDraftScheduler)
    s.max_num_running_reqs = 4
    s.running = [FakeRequest("a", 40), FakeRequest("b", 10)]
    s.waiting = []
    s._drafted_upto = {"a": 30, "gone": 7}
    assert s.replay_per_request() == (11 + 11) / 2    # a: positions 30..40, b: all 11 (never drafted)
    # a waiting request's prompt counts: the probe's first drafter pass would cover it
    s.waiting = [types.SimpleNamespace(request_id="c", num_tokens=2000)]
    assert s.replay_per_request() == (11 + 11 + 2000) / 3
    s.running = []
    assert s.replay_per_request() == 2000.0
    s.waiting = []
    assert s.replay_per_request() == 0.0


def test_replay_per_request_counts_the_waiting_requests_the_next_step_could_admit():
    """Of a long queue, only as many waiting requests as there are free batch slots count (in queue order):
    the estimate is what the next drafting step can replay, and costs no more than a full batch to compute."""
    from vllm_frontier.spec_decode.scheduler import AdaptiveDraftScheduler

    s = AdaptiveDraftScheduler.__new__(AdaptiveDraftScheduler)
    s.max_num_running_reqs = 4
    s.running = [FakeRequest("a", 40), FakeRequest("b", 10)]
    s._drafted_upto = {"a": 41, "b": 11}   # both caught up
    reads = []

    class Queue(list):   # a waiting queue that records how far it was read
        def __iter__(self):
            for i, r in enumerate(list.__iter__(self)):
                reads.append(i)
                yield r

    s.waiting = Queue(types.SimpleNamespace(request_id=f"w{i}", num_tokens=100 + i) for i in range(10_000))
    assert s.replay_per_request() == (0 + 0 + 100 + 101) / 4   # two free slots: w0 and w1
    assert max(reads) <= 2
    s.running = [FakeRequest(f"r{i}", 10) for i in range(4)]   # a full batch: no waiting request counts
    s._drafted_upto = {f"r{i}": 11 for i in range(4)}
    reads.clear()
    assert s.replay_per_request() == 0.0 and max(reads, default=0) <= 0


def test_drafts_are_trimmed_after_a_drafting_step_and_not_looked_for_after_a_trim_to_zero(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_frontier.spec_decode.scheduler import PinnedDraftScheduler

    class Req:   # counts reads of its drafts
        def __init__(self):
            self.reads, self._drafts = 0, []

        @property
        def spec_token_ids(self):
            self.reads += 1
            return self._drafts

        @spec_token_ids.setter
        def spec_token_ids(self, v):
            self._drafts = v

    def fake_schedule(self, *args, **kwargs):
        k = self.dynamic_sd_lookup[len(self.running)]
        seen.append([list(r._drafts) for r in self.running])
        for r in self.running:   # vLLM clears a scheduled request's drafts; the drafter makes k new ones
            r._drafts = list(range(k))
        return types.SimpleNamespace(num_scheduled_tokens={}, scheduled_spec_decode_tokens={},
                                     total_num_scheduled_tokens=0, num_spec_tokens_to_schedule=k)

    monkeypatch.setattr(Scheduler, "schedule", fake_schedule)
    s = PinnedDraftScheduler.__new__(PinnedDraftScheduler)
    s.num_spec_tokens, s.max_num_running_reqs, s._skips = 3, 4, True
    s._policy = object()   # active; the pin below decides every k
    s._step = s._rule_step = s._refreshed_at = s._run = s._verify_run = 0
    s._stale, s._pending, s._quiet_until, s._may_hold_drafts = False, None, 0, True
    s._counts = {"k_histogram": [0] * 4, "quiet_steps": 0}
    s._pin_path, s._after_idle, s._request_pinned, s._is_pinned = None, False, True, False
    s.running, s.requests, s._drafted_upto = [Req(), Req()], {}, {}
    seen = []
    for ks in ([3], [1], [0], [0], [0], [2]):
        s._pin = ks
        s.schedule()
    # drafts made under k = 3 trimmed to 1, then to 0; none looked for while k stays 0; then k = 2 drafts
    assert seen == [[[], []], [[0], [0]], [[], []], [[], []], [[], []], [[], []]]
    # looked at in steps 1-3 only (1 read, or 2 where trimmed); without the skip steps 4-6 would read them too
    assert [r.reads for r in s.running] == [5, 5]
