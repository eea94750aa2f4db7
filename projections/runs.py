"""Runs and steps: run state, step count, tokens, spend and open reservations per run; one row per step."""

from __future__ import annotations

from collections.abc import Sequence

from projections.base import Projection
from rungate.clock import iso_minus, parse_iso
from rungate.events import Recorded
from rungate.events import canonical_json as _json
from rungate.store.base import Image, Statement
from rungate.usage import Usage

# Per cap (`BudgetAlerted.cap`): the runs column holding the highest alert fraction reached, and the flag
# set once the cap was exceeded (the agent's hourly cap has none: it is not the run's own).
ALERT_LEVEL = {"run_usd": "budget_alert_level", "run_tokens": "budget_alert_level_tokens",
               "agent_hourly_usd": "budget_alert_level_hourly"}
EXCEEDED = {"run_usd": "budget_exceeded", "run_tokens": "budget_exceeded_tokens"}


class RunsProjection(Projection):
    name = "runs"
    tables = ("responses", "agent_spend", "rate_buckets", "steps", "runs")
    # A step's row is written by three events only; the writer keeps what `StepStarted` wrote, so settling a
    # step it admitted needs no read of the row (see `images`).
    image_tables = ("steps",)
    ddl = (
        """CREATE TABLE IF NOT EXISTS runs (
            id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, status TEXT NOT NULL, auto INTEGER NOT NULL,
            policy TEXT, policy_id TEXT, policy_version INTEGER, idle_timeout_s INTEGER,
            started_at TEXT NOT NULL, ended_at TEXT, ended_reason TEXT,
            metadata TEXT NOT NULL DEFAULT '{}', step_count INTEGER NOT NULL DEFAULT 0,
            tokens_input BIGINT NOT NULL DEFAULT 0, tokens_output BIGINT NOT NULL DEFAULT 0,
            spend_pusd BIGINT NOT NULL DEFAULT 0, reserved_pusd BIGINT NOT NULL DEFAULT 0,
            reserved_tokens BIGINT NOT NULL DEFAULT 0, budget_add_pusd BIGINT NOT NULL DEFAULT 0,
            budget_alert_level REAL NOT NULL DEFAULT 0, budget_exceeded INTEGER NOT NULL DEFAULT 0,
            budget_alert_level_tokens REAL NOT NULL DEFAULT 0, budget_exceeded_tokens INTEGER NOT NULL DEFAULT 0,
            budget_alert_level_hourly REAL NOT NULL DEFAULT 0,
            unpriced_steps INTEGER NOT NULL DEFAULT 0, open_steps INTEGER NOT NULL DEFAULT 0,
            last_activity_at TEXT NOT NULL,
            position BIGINT NOT NULL)""",
        # `position` last: admission's "newest active auto-run of this agent" is read off the index, unsorted.
        "CREATE INDEX IF NOT EXISTS runs_agent_status ON runs (agent_id, status, auto, position)",
        "CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at)",
        """CREATE TABLE IF NOT EXISTS steps (
            id TEXT PRIMARY KEY, run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
            endpoint TEXT, provider TEXT, model TEXT, tool TEXT, stream INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL, http_status INTEGER, tokens_input BIGINT NOT NULL DEFAULT 0,
            tokens_output BIGINT NOT NULL DEFAULT 0, tokens_cached BIGINT NOT NULL DEFAULT 0,
            tokens_cache_write BIGINT NOT NULL DEFAULT 0, tokens_reasoning BIGINT NOT NULL DEFAULT 0,
            reserved_pusd BIGINT NOT NULL DEFAULT 0, reserved_tokens BIGINT NOT NULL DEFAULT 0,
            fingerprint TEXT, cost_pusd BIGINT, unpriced INTEGER NOT NULL DEFAULT 0,
            estimated INTEGER NOT NULL DEFAULT 0, latency_ms INTEGER, error TEXT,
            tool_calls TEXT NOT NULL DEFAULT '[]', started_at TEXT NOT NULL, ended_at TEXT,
            position BIGINT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS steps_run ON steps (run_id, seq)",
        # Runaway protection counts a run's identical requests. Only steps admitted under a policy carry their
        # fingerprint here (see `_step_started`): the others take no place in the index, which saves each
        # admission an index insert and each commit of them a page or two of WAL.
        "CREATE INDEX IF NOT EXISTS steps_fingerprint ON steps (run_id, fingerprint)"
        " WHERE fingerprint IS NOT NULL",
        # The agent's rolling hourly cap: settled spend per minute (`2026-11-27T07:41`), per agent.
        """CREATE TABLE IF NOT EXISTS agent_spend (
            agent_id TEXT NOT NULL, minute TEXT NOT NULL, spend_pusd BIGINT NOT NULL,
            PRIMARY KEY (agent_id, minute))""",
        # Rate limits: requests and (reserved) tokens per second, per scope (`agent:ID`, `run:ID`).
        """CREATE TABLE IF NOT EXISTS rate_buckets (
            scope TEXT NOT NULL, second BIGINT NOT NULL, requests BIGINT NOT NULL, tokens BIGINT NOT NULL,
            PRIMARY KEY (scope, second))""",
        # Responses API answers by their id, with the tokens (input and output) a call that continues one
        # (`previous_response_id`) carries as input: what its reservation counts beyond its own body.
        """CREATE TABLE IF NOT EXISTS responses (
            id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, tokens BIGINT NOT NULL, position BIGINT NOT NULL)""",
    )

    indexes = (
        # Reads that recur as the tables grow. Without these, the sweeper's every 30 seconds (idle auto-runs,
        # steps no process will settle) read the whole table (a million steps took 100-140 ms, on the reader
        # every admin read shares), and a page of an agent's runs, or of runs in one status, sorted all of them
        # (110 ms for an agent with 100,000). Calls leave the runs indexes alone: their columns change only
        # when a run opens or closes. (Not a partial index `WHERE status = 'active' AND auto = 1`: SQLite then
        # prepares again, on every execution, each statement that compares those columns with a bound value,
        # as admission's look-up of the active run does: 7.5% more instructions per call.) A step enters the
        # steps index when admitted and leaves it when settled.
        "CREATE INDEX IF NOT EXISTS runs_status_started ON runs (status, started_at, id)",
        "CREATE INDEX IF NOT EXISTS runs_agent_started ON runs (agent_id, started_at, id)",
        # An agent's runs in one status: else walked along one of the two above (790 ms for an agent's one
        # completed run among 300,000).
        "CREATE INDEX IF NOT EXISTS runs_agent_status_started ON runs (agent_id, status, started_at, id)",
        "CREATE INDEX IF NOT EXISTS steps_open ON steps (started_at) WHERE status = 'started'",
    )

    def __init__(self) -> None:
        super().__init__()
        self.handlers.update({
            "RunStarted": self._run_started,
            "RunCompleted": self._run_completed,
            "RunStopped": self._run_stopped,
            "RunBlocked": self._run_blocked,
            "RunResumed": self._run_resumed,
            "BudgetAlerted": self._budget_alerted,
            "BudgetExceeded": self._budget_exceeded,
            "StepStarted": self._step_started,
            "StepCompleted": self._step_completed,
            "ToolStepLogged": self._tool_step,
            # A retry of a held request, and a decision on one of its gates (an expiry too), are the run's
            # activity: a decided answer waits a whole idle window for the agent's retry.
            "HeldAnswerRetried": self._touched,
            "ApprovalGranted": self._touched,
            "ApprovalRejected": self._touched,
            "ApprovalExpired": self._touched,
        })

    def images(self, rec: Recorded) -> Sequence[Image]:
        """A started step's row as `_step_started` inserts it (the columns a settlement reads); any other event
        that writes a step's row (its completion, a logged tool step) leaves it to be read again."""
        d = rec.data
        if rec.type == "StepStarted":
            return (("steps", d["step_id"], {
                "status": "started", "run_id": d["run_id"], "provider": d["provider"], "model": d["model"],
                "reserved_pusd": d["reserved_pusd"], "reserved_tokens": d.get("reserved_tokens", 0)}),)
        if rec.type in ("StepCompleted", "ToolStepLogged"):
            return (("steps", d["step_id"], None),)
        return ()

    def _run_started(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        ref = d.get("policy") or {}
        return [("INSERT INTO runs (id, agent_id, status, auto, policy, policy_id, policy_version, idle_timeout_s,"
                 " started_at, last_activity_at, position) VALUES (?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?)",
                 (d["run_id"], d["agent_id"], int(d["auto"]), _json(ref) if ref else None, ref.get("id"),
                  ref.get("version"), d.get("idle_timeout_s"), rec.recorded_at, rec.recorded_at, rec.position))]

    def _touched(self, rec: Recorded) -> list[Statement]:
        return [("UPDATE runs SET last_activity_at = ?, position = ? WHERE id = ?",
                 (rec.recorded_at, rec.position, rec.data["run_id"]))]

    def _run_stopped(self, rec: Recorded) -> list[Statement]:
        return [("UPDATE runs SET status = 'stopped', ended_reason = ?, last_activity_at = ?, position = ?"
                 " WHERE id = ?",
                 (rec.data.get("reason") or "stopped by an operator", rec.recorded_at, rec.position,
                  rec.data["run_id"]))]

    def _run_blocked(self, rec: Recorded) -> list[Statement]:
        # Only an active run becomes blocked (a stop, say, recorded in the same batch stays a stop).
        return [("UPDATE runs SET status = 'blocked', ended_reason = ?, last_activity_at = ?, position = ?"
                 " WHERE id = ? AND status = 'active'",
                 (rec.data["rule"], rec.recorded_at, rec.position, rec.data["run_id"]))]

    def _budget_alerted(self, rec: Recorded) -> list[Statement]:
        # Thresholds only rise: a run is alerted once per threshold, even after a top-up lowers its fraction.
        column = ALERT_LEVEL[rec.data.get("cap", "run_usd")]
        return [(f"UPDATE runs SET {column} = ?, position = ? WHERE id = ? AND {column} < ?",
                 (rec.data["threshold"], rec.position, rec.data["run_id"], rec.data["threshold"]))]

    def _budget_exceeded(self, rec: Recorded) -> list[Statement]:
        column = EXCEEDED[rec.data.get("cap", "run_usd")]
        return [(f"UPDATE runs SET {column} = 1, position = ? WHERE id = ?", (rec.position, rec.data["run_id"]))]

    def _run_resumed(self, rec: Recorded) -> list[Statement]:
        return [("UPDATE runs SET status = 'active', ended_at = NULL, ended_reason = NULL,"
                 " budget_add_pusd = budget_add_pusd + ?, last_activity_at = ?, position = ? WHERE id = ?",
                 (rec.data.get("add_pusd", 0), rec.recorded_at, rec.position, rec.data["run_id"]))]

    def _run_completed(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [("UPDATE runs SET status = ?, ended_at = ?, ended_reason = ?, metadata = ?, position = ?"
                 " WHERE id = ?",
                 (d["status"], rec.recorded_at, d["ended_reason"], _json(d.get("metadata") or {}),
                  rec.position, d["run_id"]))]

    def _step_started(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [
            ("INSERT INTO steps (id, run_id, seq, kind, endpoint, provider, model, stream, status,"
             " reserved_pusd, reserved_tokens, fingerprint, started_at, position)"
             " VALUES (?, ?, (SELECT step_count + 1 FROM runs WHERE id = ?), ?, ?, ?, ?, ?, 'started', ?, ?, ?, ?, ?)",
             (d["step_id"], d["run_id"], d["run_id"], d["kind"], d["endpoint"], d["provider"], d["model"],
              int(d["stream"]), d["reserved_pusd"], d.get("reserved_tokens", 0),
              # Only a policy counts repeats (`max_repeats`, per run): a step admitted under none (or another
              # attempt of a call, which has no fingerprint) is never looked up by its request, so it takes no
              # place in that index (the event keeps it).
              (d["fingerprint"] or None) if d.get("policy") else None,
              rec.recorded_at, rec.position)),
            ("UPDATE runs SET step_count = step_count + 1, reserved_pusd = reserved_pusd + ?,"
             " reserved_tokens = reserved_tokens + ?, open_steps = open_steps + 1, last_activity_at = ?,"
             " position = ? WHERE id = ?",
             (d["reserved_pusd"], d.get("reserved_tokens", 0), rec.recorded_at, rec.position, d["run_id"])),
            *self._rate_marks(rec),
        ]

    def _rate_marks(self, rec: Recorded) -> list[Statement]:
        """Count the call in its rate windows; a scope's buckets older than ten minutes go once a minute."""
        d = rec.data
        scopes = d.get("rate_scopes")
        if not scopes:  # no rate limit applies to this call (the common case): nothing to count
            return []
        second = int(parse_iso(rec.recorded_at).timestamp())
        out: list[Statement] = []
        for scope in scopes:
            out.append(("INSERT INTO rate_buckets (scope, second, requests, tokens) VALUES (?, ?, 1, ?)"
                        " ON CONFLICT (scope, second) DO UPDATE SET requests = rate_buckets.requests + 1,"
                        " tokens = rate_buckets.tokens + excluded.tokens",
                        (scope, second, d.get("reserved_tokens", 0))))
            if second % 60 == 0:
                out.append(("DELETE FROM rate_buckets WHERE scope = ? AND second < ?", (scope, second - 600)))
        return out

    @staticmethod
    def _agent_spend(rec: Recorded, run_id: str, cost: int) -> list[Statement]:
        """Add `cost` to the run's agent's minute; at the top of each hour, drop its minutes of 2 hours ago."""
        if cost <= 0:
            return []
        minute = rec.recorded_at[:16]
        out: list[Statement] = [
            ("INSERT INTO agent_spend (agent_id, minute, spend_pusd) SELECT agent_id, ?, ? FROM runs WHERE id = ?"
             " ON CONFLICT (agent_id, minute) DO UPDATE SET spend_pusd = agent_spend.spend_pusd + excluded.spend_pusd",
             (minute, cost, run_id))]
        if minute.endswith(":00"):
            out.append(("DELETE FROM agent_spend WHERE minute < ?"
                        " AND agent_id = (SELECT agent_id FROM runs WHERE id = ?)",
                        (iso_minus(rec.recorded_at, 7200)[:16], run_id)))
        return out

    def _step_completed(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        u = Usage.from_dict(d["usage"])
        cost = d["cost_pusd"]
        return [
            # Release the reservation first: it reads the step's reserved amount before the step is closed.
            ("UPDATE runs SET reserved_pusd = reserved_pusd - (SELECT reserved_pusd FROM steps WHERE id = ?),"
             " reserved_tokens = reserved_tokens - (SELECT reserved_tokens FROM steps WHERE id = ?),"
             " tokens_input = tokens_input + ?, tokens_output = tokens_output + ?,"
             " spend_pusd = spend_pusd + ?, unpriced_steps = unpriced_steps + ?, open_steps = open_steps - 1,"
             " last_activity_at = ?, position = ? WHERE id = ?",
             (d["step_id"], d["step_id"], u.total_input, u.output, cost or 0, int(d["unpriced"]),
              rec.recorded_at, rec.position, d["run_id"])),
            ("UPDATE steps SET status = ?, http_status = ?, provider = ?, model = ?, tokens_input = ?,"
             " tokens_output = ?, tokens_cached = ?, tokens_cache_write = ?, tokens_reasoning = ?,"
             " reserved_pusd = 0, reserved_tokens = 0, cost_pusd = ?, unpriced = ?, estimated = ?, latency_ms = ?,"
             " error = ?,"
             " tool_calls = ?, ended_at = ?, position = ? WHERE id = ?",
             (d["status"], d.get("http_status"), d["provider"], d["model"], u.total_input, u.output,
              u.cached, u.cache_write + u.cache_write_1h, u.reasoning,
              cost, int(d["unpriced"]), int(d["estimated"]), d["latency_ms"], d.get("error"),
              _json(d.get("tool_calls") or []), rec.recorded_at, rec.position, d["step_id"])),
            *self._agent_spend(rec, d["run_id"], cost or 0),
            *self._response(rec, u),
        ]

    @staticmethod
    def _response(rec: Recorded, usage: Usage) -> list[Statement]:
        response_id = rec.data.get("response_id")
        if response_id is None:
            return []
        return [("INSERT INTO responses (id, agent_id, tokens, position) SELECT ?, agent_id, ?, ? FROM runs"
                 " WHERE id = ? ON CONFLICT (id) DO UPDATE SET agent_id = excluded.agent_id,"
                 " tokens = excluded.tokens, position = excluded.position",
                 (response_id, usage.total, rec.position, rec.data["run_id"]))]

    def _tool_step(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        u = d.get("usage") or {}
        cost = d.get("cost_pusd")
        unpriced = int(cost is None)  # a tool step that states no cost is flagged, never booked as $0
        return [
            ("INSERT INTO steps (id, run_id, seq, kind, provider, tool, status, tokens_input, tokens_output,"
             " cost_pusd, unpriced, latency_ms, error, started_at, ended_at, position)"
             " VALUES (?, ?, (SELECT step_count + 1 FROM runs WHERE id = ?), 'tool', ?, ?, ?, ?, ?, ?, ?, ?, ?,"
             " ?, ?, ?)",
             (d["step_id"], d["run_id"], d["run_id"], d.get("provider"), d["tool"], d["status"],
              u.get("input", 0), u.get("output", 0), cost, unpriced, d.get("latency_ms", 0), d.get("error"),
              rec.recorded_at, rec.recorded_at, rec.position)),
            ("UPDATE runs SET step_count = step_count + 1, tokens_input = tokens_input + ?,"
             " tokens_output = tokens_output + ?, spend_pusd = spend_pusd + ?, unpriced_steps = unpriced_steps + ?,"
             " last_activity_at = ?, position = ? WHERE id = ?",
             (u.get("input", 0), u.get("output", 0), cost or 0, unpriced, rec.recorded_at, rec.position,
              d["run_id"])),
            *self._agent_spend(rec, d["run_id"], cost or 0),
        ]
