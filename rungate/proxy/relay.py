"""Relaying a stream to the agent one SSE event at a time: metered, watched for blocked and gated tool
calls, translated when another vendor serves it, held back until its first token when it may still fail over,
stitched when another target continues it; every ending is written into the stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

from rungate.approvals import Hold
from rungate.enforce.policy import CompiledPolicy
from rungate.errors import GovernanceRefusal, ProviderError, RungateError, StoreError
from rungate.events import NewEvent
from rungate.providers.metering import ToolCall
from rungate.providers.sse import SSEParser
from rungate.proxy.call import (
    Call,
    ClientGone,
    FailedAttempt,
    agent_calls,
    rungate_headers,
    send_to_agent,
    settle_step,
    shielded,
    start_stream,
    trailer,
)
from rungate.proxy.crossing import StreamTranslator
from rungate.proxy.failover import Failure
from rungate.proxy.formats import CHAT, stream_error_event
from rungate.proxy.gating import buffers_stream
from rungate.proxy.holding import await_approval, hold_if_gated
from rungate.proxy.keys import PRICES, STORE, STREAM_STARTED
from rungate.proxy.upstream import relayed_headers
from rungate.runs import force_stopped, policy_fields
from rungate.translate.continuation import ChatContinuation, MessagesContinuation
from rungate.translate.streams import DONE

MAX_HELD_BYTES = 16 * 1024 * 1024  # the most of a streamed answer held back while its tool calls are unknown
MAX_PREAMBLE_BYTES = 1024 * 1024  # the most of a routed stream held back while no token has come


class _ToolBlocked(Exception):
    """A streamed answer named `tool`, which the run's policy blocks — or, `gated`, which needs approval
    although the request did not offer it (so its stream was not held back): it is cut, never relayed."""

    def __init__(self, tool: str, gated: bool = False) -> None:
        super().__init__(tool)
        self.tool = tool
        self.gated = gated


def _withheld_refusal(call: Call, status: str, withheld: _ToolBlocked | None, http_status: int,
                      error: str | None) -> RungateError:
    """The error for a held-back stream that did not end cleanly: what a plain call would have got."""
    if status == "stopped":
        refusal = force_stopped(call.run_id, call.policy)
        refusal.headers.update(rungate_headers(call))
        return refusal
    if status == "blocked" and withheld is not None and not withheld.gated:
        return tool_refusal(call, withheld.tool)
    return _provider_error(call, "The provider's answer broke off before it was complete.", http_status,
                           error or status)


def _unoffered_gated_name(call: Call, names: Sequence[str]) -> str | None:
    """The first tool an answer calls that an approval rule (enforced) may gate, when the stream was not held
    back for it (the request did not offer it)."""
    if call.policy is None:
        return None
    return next((name for name in names if name and call.policy.approvals.enforces(name)), None)


def _blocked_name(call: Call, names: Sequence[str]) -> str | None:
    """The first of these tool names the run's policy blocks (enforced), if any."""
    policy = call.policy
    if policy is None or not _blocks_tools(policy):
        return None
    return next((name for name in names if name and policy.tools_blocked.blocked(name)), None)


def _blocks_tools(policy: CompiledPolicy | None) -> bool:
    """Whether `policy` refuses (not just reports) some tool."""
    return policy is not None and policy.tools_mode != "shadow" and bool(policy.tools_blocked.patterns)


def blocked_tool(call: Call, tool_calls: Sequence[ToolCall]) -> str | None:
    """The first tool the answer calls that the run's policy blocks (enforced), if any."""
    return _blocked_name(call, [t.name for t in tool_calls])


def note_shadowed_tools(call: Call, tool_calls: Sequence[ToolCall]) -> None:
    """Record the tools the answer calls that the run's shadow-mode `tools.blocked` would have refused: a
    decision on the step (its StepCompleted) and, where headers are still to go, `x-rungate-warning`."""
    policy = call.policy
    if policy is None or policy.tools_mode != "shadow" or not policy.tools_blocked.patterns:
        return
    for name in dict.fromkeys(t.name for t in tool_calls if t.name and policy.tools_blocked.blocked(t.name)):
        message = f"the answer called tool {name}, which this policy blocks"
        call.decisions.append({"rule": "tools.blocked", "code": "tool_blocked", "mode": "shadow", "message": message})
        call.warnings.append(f"shadow: tool_blocked (tools.blocked): {message}")


def tool_refusal(call: Call, tool: str) -> GovernanceRefusal:
    """403 `tool_blocked` for an answer that called `tool`: paid for, not delivered."""
    assert call.policy is not None
    error = GovernanceRefusal(f"The answer called tool {tool}, which this run's policy blocks; it was not delivered.",
                              code="tool_blocked", status=403, run_id=call.run_id, context={
                                  "rule": "tools.blocked", "tool": tool, "where": "answer",
                                  **policy_fields(call.policy),
                                  "next": "Ask again without that tool, or ask an operator."},
                              headers={"x-should-retry": "false"})
    error.headers.update(rungate_headers(call))
    return error


def _provider_error(call: Call, message: str, status: int | None, reason: str) -> ProviderError:
    error = ProviderError(message, [{"provider": call.target.provider, "model": call.target.model,
                                     "status": status, "error": reason}])
    error.headers.update(rungate_headers(call))
    return error


async def relay_stream(request: web.Request, call: Call, upstream: aiohttp.ClientResponse,
                       client_wants_usage: bool) -> web.StreamResponse:
    """Relay SSE events as they arrive; once headers are out, every ending is written into the stream."""
    store, prices = request.app[STORE], request.app[PRICES]
    upstream_fmt, crossing = call.upstream_fmt, call.crossing
    assert upstream_fmt.meter is not None
    meter = call.meter = upstream_fmt.meter(client_wants_usage or crossing is not None)
    # A call another target may continue goes through its stitcher, so that every upstream's events make one
    # answer in the agent's stream; once that stream started, this attempt continues it.
    client = call.client
    stitcher = None if client is None else client.stitcher
    continuing = client is not None and client.started
    # Served by the other vendor: each upstream event becomes the agent's events in its own format.
    translator = None if crossing is None else crossing.stream(call.model_asked, call.tool_names,
                                                               call.input_estimate, client_wants_usage, stitcher)
    # What turns an upstream event into the agent's events, when they are not relayed byte for byte.
    feeder: StreamTranslator | ChatContinuation | MessagesContinuation | None = translator or stitcher
    answer_headers = relayed_headers(upstream.headers)
    if client is not None and client.response is not None:
        response = client.response
    else:
        response = web.StreamResponse(status=upstream.status, headers=answer_headers)
        response.headers.update(rungate_headers(call, final=False))
        if client is not None:
            client.response = response
    # A stream that may call a gated tool is held back whole: its 202 must come before any SSE byte. A routed
    # one is held back until its first token, so that a stream failing before then can still fail over.
    buffered: list[bytes] | None = [] if not continuing and buffers_stream(call.policy, call.offered) else None
    pending: list[bytes] | None = [] if buffered is None and call.routed else None
    if buffered is None and pending is None and not continuing:  # relayed as it comes: the headers go now
        await start_stream(request, response)
    timed_out = False
    parser = SSEParser()
    held_done: bytes | None = None
    status, error = "ok", None
    # Only a call under a policy that blocks tools (enforced) pays for watching the tool calls of a stream;
    # one under approval rules whose stream was relayed as it came (it offered no gated tool) watches for a
    # gated tool all the same: a model that calls one anyway is cut before the call goes out. Names are
    # looked at only when a new one appears.
    watch_tools = _blocks_tools(call.policy)
    watch_gates = buffered is None and call.policy is not None and bool(call.policy.approvals)
    seen_names: tuple[str, ...] = ()
    held_bytes = 0
    withheld: _ToolBlocked | None = None

    async def relay(events: Sequence[Any]) -> None:
        """Forward the complete events of one upstream read in one write (nothing waits for more)."""
        nonlocal held_done, seen_names
        out: list[bytes] = []
        for event in events:
            if not meter.feed(event):
                continue
            if meter.malformed:  # not relayed: the stream is broken from here
                if out:
                    await emit(b"".join(out))
                raise ValueError("the provider sent an event that is not JSON")
            if pending is not None and meter.error is not None:  # not relayed: the next target may serve
                raise ValueError("the provider sent an error before its first token")
            if watch_tools or watch_gates:
                names = meter.tool_names
                if names != seen_names:
                    seen_names = names
                    if crossing is not None:  # the agent's names for them
                        names = tuple(call.tool_names.original(name) for name in names)
                    blocked = _blocked_name(call, names) if watch_tools else None
                    gated = _unoffered_gated_name(call, names) if watch_gates and blocked is None else None
                    if blocked is not None or gated is not None:
                        if out:
                            await emit(b"".join(out))
                        # this event names a blocked (or unoffered gated) tool: it is not relayed
                        raise _ToolBlocked(blocked or gated or "", gated=gated is not None)
            if feeder is not None:
                for item in feeder.feed(event):  # ValueError on an event it cannot read: a break
                    if item == DONE:
                        held_done = item  # written after settlement, with the trailer
                    else:
                        out.append(item)
                continue
            if call.fmt is CHAT and event.data.strip() == "[DONE]":
                held_done = event.raw  # written after settlement, with the trailer
                continue
            out.append(event.raw)
        if out:
            await emit(b"".join(out))

    async def emit(data: bytes) -> None:
        nonlocal held_bytes, pending
        if pending is not None:
            pending.append(data)
            held_bytes += len(data)
            # The first token: from here on the answer is the agent's (as is a preamble past all reason).
            if meter.output_text_bytes or held_bytes > MAX_PREAMBLE_BYTES:
                if not response.prepared:
                    await start_stream(request, response)
                data, pending = b"".join(pending), None
            else:
                return
        if buffered is None:
            await send_to_agent(response, data)
            return
        held_bytes += len(data)
        if held_bytes > MAX_HELD_BYTES:
            raise ValueError(f"the answer is over {MAX_HELD_BYTES} bytes, more than can be held for approval")
        buffered.append(data)

    try:
        try:
            first_token_s = call.target.first_token_s
            if first_token_s is not None and pending is not None:  # the first token must come in time
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + first_token_s
                                              - (time.monotonic() - call.started)):
                    while pending is not None and (chunk := await upstream.content.readany()):
                        await relay(parser.feed(chunk))
            async for chunk in upstream.content.iter_any():
                await relay(parser.feed(chunk))
            await relay(parser.flush())
        except (aiohttp.ClientError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            status, error = "cut", f"upstream stream broke: {type(exc).__name__}"
            if call.stopped:
                status, error = "stopped", "the run was stopped by an operator"
        except ValueError as exc:  # an SSE event beyond the parser's size bound
            status, error = "cut", f"upstream stream unreadable: {exc}"
        except _ToolBlocked as exc:
            withheld = exc
            status, error = "blocked", (f"the answer called {exc.tool}, which needs approval, without the request"
                                        " offering it" if exc.gated else f"the answer called a blocked tool"
                                                                          f" ({exc.tool})")
            upstream.close()
        if status == "ok" and call.stopped:
            status, error = "stopped", "the run was stopped by an operator"
        if status == "ok" and not meter.done:
            status, error = "cut", "upstream stream ended without its final event"
        if translator is not None:
            call.translated(translator.warnings)
        if meter.error is not None and status == "ok":
            status, error = "error", "the provider sent an error event"
        usage, estimated = call.seen_usage()
        gated: Hold | None = None
        then: tuple[NewEvent, ...] = ()
        tool_calls = agent_calls(call, meter.tool_calls)
        note_shadowed_tools(call, tool_calls)
        if buffered is not None and status == "ok":
            gated, then = hold_if_gated(call, tool_calls, upstream.status, answer_headers,
                                        b"".join(buffered) + (held_done or b""), stream=True)
            if gated is not None:
                status, error = "held", None
        try:
            await settle_step(store, prices, call, status=status, http_status=upstream.status, usage=usage,
                              estimated=estimated, error=error, tool_calls=tool_calls, then=then)
        except StoreError:
            if gated is not None:  # not recorded, so not held: the gated call must not go out either
                raise
            status, error = "cut", "the step could not be recorded"
        if gated is not None:
            return await await_approval(request, call, gated)
        if call.routed and status in ("cut", "error") and (pending is not None or buffered is not None):
            # Nothing reached the agent: the call is tried again, or elsewhere.
            raise FailedAttempt(Failure(error or status, timed_out=timed_out))
        if status == "cut" and stitcher is not None and stitcher.resumable and response.prepared:
            # Tokens reached the agent: another target may continue the answer in this same stream.
            raise FailedAttempt(Failure(error or status, timed_out=timed_out))
        if buffered is not None and status != "ok":
            # Held back in case it called a gated tool, and it did not end cleanly: none of it goes out (its
            # tool calls were never judged whole); nothing was sent yet, so the agent gets a plain error.
            raise _withheld_refusal(call, status, withheld, upstream.status, error)
        # The ending goes out in one write with the end of the body (one send, not three).
        tail: list[bytes] = []
        if status == "cut":
            call.broken = True
            tail.append(stream_error_event(call.fmt, "The stream broke off before the end."))
        elif status == "stopped":
            tail.append(stream_error_event(call.fmt, "An operator stopped this run; the stream ends here.",
                                           code="run_force_stopped"))
        elif withheld is not None and withheld.gated:
            tail.append(stream_error_event(call.fmt, "The answer called a tool that needs approval, which the"
                                                     " request did not offer; the stream ends here.",
                                           code="tool_approval_required"))
        elif status == "blocked":
            tail.append(stream_error_event(call.fmt, "The answer called a tool this run's policy blocks"
                                                     " (tool_blocked); the stream ends here.", code="tool_blocked"))
        # Chat streams: the trailer follows [DONE]. Stock OpenAI SDKs stop reading at [DONE], so they never see
        # it (placed before, openai 3.x yields it as a chunk whose `choices` is None and naive loops crash);
        # the `rungate` SDK reads on to the end of the body and picks it up. Other formats end with it.
        if held_done is not None and status not in ("cut", "stopped", "blocked"):
            tail.append(held_done)
        if call.settled:
            tail.append(trailer(call))
        with contextlib.suppress(ConnectionError):  # the step is settled: a client gone now loses nothing
            if buffered is not None:  # held back in case it called a gated tool; it did not: it goes out now
                response.headers.update(rungate_headers(call, final=False))
                request[STREAM_STARTED] = True
                await response.prepare(request)
                tail[:0] = buffered
            elif pending is not None:  # it ended before a first token (an empty answer, or an error relayed)
                await start_stream(request, response)
                tail[:0] = pending
            await response.write_eof(b"".join(tail))
    except ClientGone:
        usage, estimated = call.seen_usage()
        await shielded(settle_step(store, prices, call, status="client_closed", http_status=upstream.status,
                                usage=usage, estimated=estimated, error="client disconnected",
                                tool_calls=agent_calls(call, meter.tool_calls)))
    return response
