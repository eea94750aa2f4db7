"""The `rungate` command line: serve, demo, agents, keys, policies, runs, approvals, replay, verify, rebuild.

Operator commands work on the database directly (the same event log the server writes), so they run
beside a live server or without one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import yaml
from aiohttp import web

from rungate import __version__, queries, yamldoc
from rungate.admin import add_provider_key, create_agent, open_keyring
from rungate.approvals import DecideApproval, check_decision
from rungate.clock import now_iso
from rungate.config import Settings, load_settings
from rungate.enforce.policy import InvalidPolicy
from rungate.errors import BadRequest, ConfigError, NotFound, RungateError
from rungate.log import configure
from rungate.policy_admin import apply_policy, policy_view
from rungate.prices import parse_usd
from rungate.proxy.gating import checked_edit
from rungate.runs import ResumeRun, StopRun, run_stream
from rungate.storage import open_store
from rungate.store import Anchor, EventStore
from rungate.views import agent_view, approval_view, budgeted_run_view, provider_key_view, step_view


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


async def _with_store(settings: Settings, work: Callable[[EventStore], Awaitable[int]]) -> int:
    store = open_store(settings)
    await store.start()
    try:
        return await work(store)
    finally:
        await store.close()


def _serve(settings: Settings) -> int:
    from rungate.proxy.app import create_app

    app = create_app(settings)
    listening = (f"rungate {__version__} listening on http://{settings.host}:{settings.port}"
                 f" (database {settings.database_display}{', mock provider' if settings.mock else ''})")
    try:
        # aiohttp prints once the database is open and the socket bound: only then is Rungate listening.
        web.run_app(app, host=settings.host, port=settings.port, access_log=None,
                    print=lambda _: print(listening, flush=True))
    except OSError as exc:  # the address is taken, or not this machine's
        raise ConfigError(f"RUNGATE_HOST/RUNGATE_PORT: cannot listen on {settings.host}:{settings.port}:"
                          f" {exc.strerror or exc}") from None
    return 0


async def _agents_create(store: EventStore, name: str, policy: str | None) -> int:
    row, token = await create_agent(store, name, policy=policy)
    _print_json(agent_view(row, token))
    print(f"\nToken (shown once): {token}", file=sys.stderr)
    return 0


async def _policies_apply(store: EventStore, path: str) -> int:
    """Apply a YAML or JSON policy file: create it, add a version, or report that nothing changed."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yamldoc.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BadRequest(f"{path} is not valid YAML or JSON: {exc}") from None
    try:
        row, outcome = await apply_policy(store, raw)
    except InvalidPolicy as exc:
        print(f"error: {path}: the policy is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem['path']}: {problem['reason']}", file=sys.stderr)
        return 1
    print(f"policy {row['name']} {outcome} (version {row['version']}, id {row['id']})", file=sys.stderr)
    _print_json(policy_view(row))
    return 0


async def _policies_list(store: EventStore) -> int:
    _print_json([policy_view(r) for r in await queries.list_policies(store)])
    return 0


async def _policies_show(store: EventStore, ref: str) -> int:
    """`NAME` (current version) or `NAME@VERSION`."""
    name, _, version = ref.partition("@")
    row = await queries.policy_by_name(store, name)
    if row is not None and version:
        if not version.isdigit():
            raise BadRequest(f"{ref}: the version must be a number")
        row = await queries.policy_version(store, row["id"], int(version))
    if row is None:
        raise NotFound(f"policy {ref} not found")
    _print_json(policy_view(row))
    return 0


async def _agents_list(store: EventStore) -> int:
    _print_json([agent_view(r) for r in await queries.list_agents(store)])
    return 0


async def _keys_add(settings: Settings, store: EventStore, provider: str, name: str, key_env: str | None) -> int:
    if key_env:
        import os

        secret = os.environ.get(key_env)
        if not secret:
            raise ConfigError(f"{key_env} is empty or not set")
    else:
        import getpass

        secret = getpass.getpass(f"{provider} API key for {name!r}: ") if sys.stdin.isatty() else sys.stdin.readline()
    row = await add_provider_key(store, await open_keyring(settings, store), provider, name, secret.strip())
    _print_json(provider_key_view(row))
    return 0


async def _keys_list(store: EventStore) -> int:
    _print_json([provider_key_view(r) for r in await queries.list_provider_keys(store)])
    return 0


async def _runs_list(store: EventStore, agent_id: str | None, status: str | None, limit: int) -> int:
    rows, _ = await queries.list_runs(store, agent_id=agent_id, status=status, limit=limit)
    for row in rows:
        view = await budgeted_run_view(store, row)
        print(f"{view['id']}  {view['status']:<9}  steps={view['step_count']:<4}  spend=${view['spend_usd']:<12}"
              f"  agent={view['agent_id']}  started={view['started_at']}")
    if not rows:
        print("no runs")
    return 0


async def _runs_show(store: EventStore, run_id: str) -> int:
    row = await queries.get_run(store, run_id)
    if row is None:
        print(f"run {run_id} not found", file=sys.stderr)
        return 1
    steps = [step_view(s) for s in await queries.run_steps(store, run_id)]
    _print_json({**await budgeted_run_view(store, row), "steps": steps})
    return 0


async def _runs_stop(store: EventStore, run_id: str, reason: str | None) -> int:
    """`rungate runs stop`: record the stop in the log; later calls of the run are refused everywhere, and
    a server running on the same database cuts the calls it has in flight (`rungate.proxy.inflight`)."""
    command = StopRun(run_id, reason)
    await store.execute(command)
    print(f"run {run_id} {'stopped' if command.stopped else 'was already stopped'}; a server running on this"
          f" database cuts the run's calls in flight within a second")
    return 0


async def _runs_resume(store: EventStore, run_id: str, add_usd: str | None) -> int:
    """`rungate runs resume`: let a stopped or blocked run take calls again, with an optional top-up."""
    try:
        add_pusd = parse_usd(add_usd) if add_usd is not None else 0
    except ValueError as exc:
        print(f"error: --add-usd {exc}", file=sys.stderr)
        return 2
    await store.execute(ResumeRun(run_id, add_pusd))
    row = await queries.get_run(store, run_id)
    assert row is not None  # ResumeRun refused an unknown run
    view = await budgeted_run_view(store, row)
    print(f"run {run_id} {view['status']}; budget remaining ${view['budget_remaining_usd']}"
          if view["budget_remaining_usd"] is not None else f"run {run_id} {view['status']}")
    return 0


async def _approvals_list(store: EventStore, status: str | None, run_id: str | None, agent_id: str | None) -> int:
    now = now_iso()
    rows = await queries.list_approval_requests(store, agent_id=agent_id, run_id=run_id, status=status, now=now)
    _print_json([approval_view(r, now) for r in rows])
    return 0


async def _approvals_show(store: EventStore, gate_id: str) -> int:
    row = await queries.get_approval_request(store, gate_id)
    if row is None:
        print(f"approval request {gate_id} not found", file=sys.stderr)
        return 1
    _print_json(approval_view(row, now_iso()))
    return 0


async def _approvals_decide(store: EventStore, gate_id: str, approve: bool, reason: str | None,
                            decided_by: str | None, args_json: str | None) -> int:
    """`rungate approvals approve|reject`: decide a pending gate; the agent's next retry sees the outcome."""
    edited: Any = None
    if args_json is not None:
        try:
            edited = orjson.loads(args_json)
        except orjson.JSONDecodeError as exc:
            print(f"error: --args is not JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(edited, dict):
            print("error: --args must be a JSON object: the tool call's new arguments", file=sys.stderr)
            return 2
    decided_by, reason = check_decision(decided_by or "cli", reason, edited)
    await checked_edit(store, gate_id, edited)
    await store.execute(DecideApproval(gate_id, approve, decided_by, reason, edited))
    return await _approvals_show(store, gate_id)


async def _replay(store: EventStore, run_id: str, after: int) -> int:
    """Every event of the run's stream after position `after`, read in pages (a run may hold any number)."""
    events = await store.read_stream(run_stream(run_id), after_position=after, limit=_REPLAY_PAGE)
    if not events and await queries.get_run(store, run_id) is None:
        print(f"run {run_id} not found", file=sys.stderr)
        return 1
    while events:
        sys.stdout.write("".join(orjson.dumps(rec.as_line()).decode() + "\n" for rec in events))
        if len(events) < _REPLAY_PAGE:
            break
        events = await store.read_stream(run_stream(run_id), after_position=events[-1].position, limit=_REPLAY_PAGE)
    return 0


async def _verify(store: EventStore, anchors: list[Anchor]) -> int:
    report = await store.verify(anchors)
    if report.ok:
        head = f", head {report.head[0]}:{report.head[1]}" if report.head is not None else ""
        print(f"ok ({report.events} events{head})")
        return 0
    print(f"broken at position {report.broken_at}: {report.reason}")
    return 1


async def _rebuild(store: EventStore, force: bool) -> int:
    """Replay the log into fresh projections, once its chain verifies: a changed log would bake what was
    changed into the balances (`--force` rebuilds from it anyway)."""
    report = await store.verify()
    if not report.ok and not force:
        print(f"error: the event log is broken at position {report.broken_at} ({report.reason}); nothing was"
              " rebuilt (run `rungate verify`; --force rebuilds from the log as it is)", file=sys.stderr)
        return 1
    try:
        count = await store.rebuild()
    except sqlite3.Error as exc:
        print(f"error: the log cannot be replayed ({exc}); the projections are unchanged", file=sys.stderr)
        return 1
    print(f"rebuilt projections from {count} events")
    return 0


_REPLAY_PAGE = 1000
# Commands that may create the database (setting up before the first `serve`); every other one works on an
# existing log, and a mistyped path must not read as an empty, verified one.
_CREATES = {("agents", "create"), ("keys", "add"), ("policies", "apply")}


def _position(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 2**62:
        raise argparse.ArgumentTypeError("must be a log position, 0 or more")
    return value


def _anchor(text: str) -> Anchor:
    """POSITION:HASH, as `rungate verify` prints the head."""
    position, _, digest = text.partition(":")
    if not (position.isascii() and position.isdigit() and int(position) >= 1
            and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise argparse.ArgumentTypeError("must be POSITION:HASH as `rungate verify` prints the head"
                                         " (a position from 1 and a 64-digit lowercase hex hash)")
    return int(position), digest


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 10000:
        raise argparse.ArgumentTypeError("must be between 1 and 10000")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rungate", description="Governance control plane for AI agent runs.")
    parser.add_argument("--version", action="version", version=f"rungate {__version__}")
    parser.add_argument("--config", help="YAML configuration file (or RUNGATE_CONFIG)")
    parser.add_argument("--database-url", help="override RUNGATE_DATABASE_URL")
    # Every command also takes both after its name (`rungate verify --database-url …`, as SPEC §6.1 writes
    # `rungate serve --config FILE`); given there, they win over the same option before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="YAML configuration file (or RUNGATE_CONFIG)")
    common.add_argument("--database-url", default=argparse.SUPPRESS, help="override RUNGATE_DATABASE_URL")

    def command(group: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        leaf: argparse.ArgumentParser = group.add_parser(name, parents=[common], **kwargs)
        return leaf

    sub = parser.add_subparsers(dest="command", required=True)

    serve = command(sub, "serve", help="run the proxy and the admin API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--mock", action="store_true", default=None, help="route every call to the built-in mock")

    demo = command(sub, "demo", help="run a short scripted agent through the mock provider")
    demo.add_argument("--port", type=int, default=0)

    agents = sub.add_parser("agents", help="manage agents").add_subparsers(dest="action", required=True)
    agents_create = command(agents, "create")
    agents_create.add_argument("name")
    agents_create.add_argument("--policy", help="name of the default policy of the agent's runs")
    command(agents, "list")

    keys = sub.add_parser("keys", help="manage provider keys").add_subparsers(dest="action", required=True)
    add = command(keys, "add", help="store a provider key (read from stdin, or --from-env VAR)")
    add.add_argument("provider", choices=("openai", "anthropic"))
    add.add_argument("name")
    add.add_argument("--from-env", metavar="VAR")
    command(keys, "list")

    policies = sub.add_parser("policies", help="manage policies").add_subparsers(dest="action", required=True)
    command(policies, "apply", help="create or update a policy from a YAML (or JSON) file").add_argument("file")
    command(policies, "list")
    command(policies, "show", help="a policy's current version, or NAME@VERSION").add_argument("name")

    runs = sub.add_parser("runs", help="inspect runs").add_subparsers(dest="action", required=True)
    runs_list = command(runs, "list")
    runs_list.add_argument("--agent-id")
    runs_list.add_argument("--status")
    runs_list.add_argument("--limit", type=_positive, default=50)
    command(runs, "show").add_argument("run_id")
    runs_stop = command(runs, "stop", help="the kill switch: refuse the run's later calls, cut those in flight",
                        description="Refuse every later call of the run (403 run_force_stopped). A server running"
                                    " on the same database cuts the run's calls in flight when it reads the stop"
                                    " from the log (within about a quarter second).")
    runs_stop.add_argument("run_id")
    runs_stop.add_argument("--reason")
    runs_resume = command(runs, "resume", help="let a stopped or blocked run take calls again")
    runs_resume.add_argument("run_id")
    runs_resume.add_argument("--add-usd", help="raise the run's USD budget by this much, e.g. 2.50")

    approvals = sub.add_parser("approvals", help="decide approval requests (gated tool calls)").add_subparsers(
        dest="action", required=True)
    approvals_list = command(approvals, "list", help="approval requests, newest first")
    approvals_list.add_argument("--status", choices=queries.APPROVAL_STATUSES)
    approvals_list.add_argument("--run-id")
    approvals_list.add_argument("--agent-id")
    command(approvals, "show", help="one approval request").add_argument("gate_id")
    approve = command(approvals, "approve", help="approve a pending gate (optionally with edited arguments)")
    approve.add_argument("gate_id")
    approve.add_argument("--args", help="the tool call's new arguments, a JSON object (edit and approve)")
    approve.add_argument("--reason")
    approve.add_argument("--by", help="who decides (recorded; default: cli)")
    reject = command(approvals, "reject", help="reject a pending gate")
    reject.add_argument("gate_id")
    reject.add_argument("--reason")
    reject.add_argument("--by", help="who decides (recorded; default: cli)")

    replay = command(sub, "replay", help="print a run's events as NDJSON")
    replay.add_argument("run_id")
    replay.add_argument("--after", type=_position, default=0, help="only events after this log position")
    verify = command(sub, "verify", help="check the event log's hash chain (and anchors kept from earlier checks)")
    verify.add_argument("--anchor", type=_anchor, action="append", default=[], metavar="POSITION:HASH",
                        help="a head printed by an earlier verify and kept elsewhere: the event at POSITION must"
                             " still have HASH (repeatable)")
    rebuild = command(sub, "rebuild", help="drop the projections and replay the log into them (once it verifies)")
    rebuild.add_argument("--force", action="store_true", help="rebuild even if the log does not verify")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {"database_url": args.database_url}
        if args.command == "serve":
            overrides.update(host=args.host, port=args.port, mock=args.mock)
        settings = load_settings(config_file=args.config, **overrides)
        configure(settings.log_format, settings.log_level)
        if args.command == "serve":
            return _serve(settings)
        if args.command == "demo":
            from rungate.demo import run_demo

            return asyncio.run(run_demo(settings, args.port))
        path = settings.sqlite_path
        if (args.command, getattr(args, "action", None)) not in _CREATES and path is not None and not path.exists():
            raise ConfigError(f"RUNGATE_DATABASE_URL: no database at {path} (serve, agents create, keys add and"
                              " policies apply create one)")
        if args.command == "verify":  # read-only: the file checked is not written to (not even its schema)
            return asyncio.run(_verify(open_store(settings), args.anchor))
        return asyncio.run(_with_store(settings, lambda store: _dispatch(args, settings, store)))
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return 2
    except RungateError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader stopped (`rungate replay RUN | head`): what it read was whole lines
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


async def _dispatch(args: argparse.Namespace, settings: Settings, store: EventStore) -> int:
    match (args.command, getattr(args, "action", None)):
        case ("agents", "create"):
            return await _agents_create(store, args.name, args.policy)
        case ("policies", "apply"):
            return await _policies_apply(store, args.file)
        case ("policies", "list"):
            return await _policies_list(store)
        case ("policies", "show"):
            return await _policies_show(store, args.name)
        case ("agents", "list"):
            return await _agents_list(store)
        case ("keys", "add"):
            return await _keys_add(settings, store, args.provider, args.name, args.from_env)
        case ("keys", "list"):
            return await _keys_list(store)
        case ("runs", "list"):
            return await _runs_list(store, args.agent_id, args.status, args.limit)
        case ("runs", "show"):
            return await _runs_show(store, args.run_id)
        case ("runs", "stop"):
            return await _runs_stop(store, args.run_id, args.reason)
        case ("runs", "resume"):
            return await _runs_resume(store, args.run_id, args.add_usd)
        case ("approvals", "list"):
            return await _approvals_list(store, args.status, args.run_id, args.agent_id)
        case ("approvals", "show"):
            return await _approvals_show(store, args.gate_id)
        case ("approvals", "approve"):
            return await _approvals_decide(store, args.gate_id, True, args.reason, args.by, args.args)
        case ("approvals", "reject"):
            return await _approvals_decide(store, args.gate_id, False, args.reason, args.by, None)
        case ("replay", _):
            return await _replay(store, args.run_id, args.after)
        case ("rebuild", _):
            return await _rebuild(store, args.force)
    raise ConfigError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
