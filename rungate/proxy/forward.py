"""One attempt of a call: its upstream body (translated for the other vendor, or asking a target to continue
an answer), the request, and the plain answer or error it gets back (a stream goes to `relay`)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import orjson
from aiohttp import hdrs, web

from rungate.prices import PriceTable
from rungate.providers.metering import embeddings_usage_at_end
from rungate.proxy.call import Call, FailedAttempt, refuse_stopped, rungate_headers, settle_step
from rungate.proxy.crossing import CROSSINGS
from rungate.proxy.failover import Failure, failure_of
from rungate.proxy.formats import EMBEDDINGS, WireFormat
from rungate.proxy.holding import await_approval, hold_if_gated
from rungate.proxy.keys import HTTP, PRICES, SETTINGS, STORE
from rungate.proxy.relay import blocked_tool, note_shadowed_tools, relay_stream, tool_refusal
from rungate.proxy.upstream import relayed_headers, upstream_headers
from rungate.routing import RouteTarget
from rungate.runs import force_stopped
from rungate.translate.common import Untranslatable
from rungate.translate.requests import with_prefill
from rungate.usage import Usage

DEFAULT_MAX_TOKENS = 4096  # the output limit asked of another vendor's model with no known limit of its own
LARGE_ANSWER_BYTES = 256 * 1024  # an embeddings answer past this is not read whole (see `_read_answer`)
LARGE_REQUEST_BYTES = 1024 * 1024  # a request body past this is sent upstream in chunks (see `forward_attempt`)


def attempt_body(call: Call, body: dict[str, Any], spec: RouteTarget, max_output: int | None,
                 prices: PriceTable, prefill: str | None = None) -> bytes:
    """What goes upstream for one attempt: the agent's body, asking the target's model (and the output limit
    a shrinking budget set), translated when the target is the other vendor (`Untranslatable` when it cannot
    be carried). Exactly what Rungate decided on: no duplicate keys, no `rungate` key.

    With `prefill` (the answer text the agent already got from a stream that broke), the target is asked to
    continue that answer: an Anthropic target as an assistant prefill, an OpenAI one (declared `prefill:
    true`) as a final assistant message."""
    fmt = call.fmt
    if spec.model != body["model"] or max_output is not None:
        body = dict(body)
        body["model"] = spec.model
        if max_output is not None:
            body[next((k for k in fmt.max_tokens_keys if k in body), fmt.max_tokens_keys[0])] = max_output
    if spec.provider == fmt.provider:
        call.crossing = None
    else:
        crossing = call.crossing = CROSSINGS[(fmt.name, spec.provider)]
        # With no output limit asked, the target's own (what the admission reserved for), else a modest one.
        price = prices.lookup(spec.model)
        default = price.max_output_tokens if price is not None and price.max_output_tokens else DEFAULT_MAX_TOKENS
        translated = crossing.request(body, spec.model, default)
        call.tool_names = translated.tool_names
        call.translated(translated.warnings)
        body = translated.body
    if prefill is not None:
        if spec.provider == "anthropic":
            body = with_prefill(body, prefill)
        else:
            body = {**body, "messages": [*body["messages"], {"role": "assistant", "content": prefill}]}
    return orjson.dumps(body)


async def forward_attempt(request: web.Request, call: Call, forward: bytes,
                          client_wants_usage: bool) -> web.StreamResponse:
    """Send one attempt upstream and answer from it: a plain answer (or the provider's error) as a response,
    a stream through `relay_stream`. A failure before anything reached the agent settles the step and raises
    `FailedAttempt` (the caller retries or fails over)."""
    app = request.app
    store, prices = app[STORE], app[PRICES]
    url = call.target.base_url + call.upstream_fmt.upstream_path
    if call.stopped:  # the kill switch came between this attempt's admission and now: nothing is sent
        await settle_step(store, prices, call, status="stopped", http_status=None, usage=Usage(), estimated=False,
                          error="the run was stopped by an operator")
        refusal = force_stopped(call.run_id, call.policy)
        refusal.headers.update(rungate_headers(call))
        raise refusal
    call.task, call.awaiting_upstream = asyncio.current_task(), True
    target = call.target
    try:
        timeout = target.client_timeout(app[SETTINGS].upstream_timeout_s)
        # A body over a megabyte (images in base64, long contexts) goes out in chunks that let the loop run
        # between them; aiohttp warns against sending one whole (a ResourceWarning, an error under `-W error`).
        data: bytes | io.BytesIO = io.BytesIO(forward) if len(forward) > LARGE_REQUEST_BYTES else forward
        post = (app[HTTP].post(url, data=data, headers=upstream_headers(request.headers, target),
                               allow_redirects=False) if timeout is None else
                app[HTTP].post(url, data=data, headers=upstream_headers(request.headers, target),
                               allow_redirects=False, timeout=timeout))
        if target.first_token_s is None or not call.stream:
            upstream = await post
        else:  # a stream must begin in time (its headers here; its first token is watched by the relay)
            async with asyncio.timeout(target.first_token_s):
                upstream = await post
    except asyncio.CancelledError:
        if not call.stopped:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # the kill switch cancelled the wait, not the handler
        await refuse_stopped(store, prices, call, None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        call.awaiting_upstream = False  # from here a stop must not cancel the settlement
        if call.stopped:
            await refuse_stopped(store, prices, call, None)
        timed_out = isinstance(exc, TimeoutError)
        reason = "timeout" if timed_out else type(exc).__name__
        if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):  # nothing was sent
            await settle_step(store, prices, call, status="upstream_error", http_status=None, usage=Usage(),
                              estimated=False, error=reason)
        else:  # the request may have gone out: the provider may bill its prompt (never a silent $0)
            await settle_step(store, prices, call, status="upstream_error", http_status=None,
                              usage=Usage(input=call.input_estimate), estimated=True, error=reason)
        raise FailedAttempt(Failure(reason, timed_out=timed_out)) from None
    finally:
        call.awaiting_upstream = False
    call.upstream = upstream
    if call.stopped:
        upstream.close()
    async with upstream:
        if upstream.status in (401, 403):
            # The provider refused Rungate's key: the agent's own token is fine, so this is not a 401 for it,
            # and the provider's body (which may hint at the key) is not relayed.
            await settle_step(store, prices, call, status="error", http_status=upstream.status, usage=Usage(),
                              estimated=False, error=f"provider refused the key (status {upstream.status})")
            raise FailedAttempt(Failure("provider_auth_failed", status=upstream.status))
        if call.stream and upstream.status < 300 and upstream.content_type == "text/event-stream":
            return await relay_stream(request, call, upstream, client_wants_usage)
        if call.client is not None and call.client.started:  # a continuation answered with no stream to stitch
            await settle_step(store, prices, call, status="error", http_status=upstream.status, usage=Usage(),
                              estimated=False, error=f"continuation answered status {upstream.status}, not a stream")
            # A refusal of the continuation (a 4xx: e.g. no prefill on this model) says nothing of its health.
            raise FailedAttempt(Failure(f"status {upstream.status}", status=upstream.status,
                                        counts=upstream.status >= 500 or upstream.status == 429))
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            if call.stopped:
                await refuse_stopped(store, prices, call, upstream.status)
            await settle_step(store, prices, call, status="upstream_error", http_status=upstream.status,
                              usage=Usage(input=call.input_estimate), estimated=True, error=type(exc).__name__)
            raise FailedAttempt(Failure(type(exc).__name__, status=upstream.status,
                                        timed_out=isinstance(exc, TimeoutError))) from None
        headers = relayed_headers(upstream.headers)
        if upstream.status >= 400:
            await settle_step(store, prices, call, status="error", http_status=upstream.status, usage=Usage(),
                              estimated=False, error=f"upstream status {upstream.status}")
            # A routed call tries again (or elsewhere) where the provider's answer says it may help.
            failure = failure_of(upstream.status, upstream.headers, payload) if call.routed else None
            if failure is not None:
                raise FailedAttempt(failure)
            if call.crossing is not None:  # the provider's error, in the agent's format
                shown, error = call.crossing.error(upstream.status, _json_or_none(payload))
                headers.update(rungate_headers(call))
                headers[hdrs.CONTENT_TYPE] = "application/json"
                return web.Response(body=orjson.dumps(error), status=shown, headers=headers)
        else:
            parsed, usage = _read_answer(call.upstream_fmt, payload)
            if isinstance(parsed, dict) and isinstance(parsed.get("id"), str):
                call.response_id = parsed["id"]  # recorded for a Responses answer (see `settle_step`)
            if call.routed and not isinstance(parsed, dict):  # not an answer at all: another target may give one
                await settle_step(store, prices, call, status="error", http_status=upstream.status,
                                  usage=usage or Usage(input=call.input_estimate), estimated=usage is None,
                                  error="the answer is not a JSON object")
                raise FailedAttempt(Failure("unreadable answer", status=upstream.status))
            if call.crossing is not None:  # the answer, in the agent's format
                try:
                    answer = call.crossing.answer(parsed, call.model_asked, call.tool_names)
                except Untranslatable:
                    await settle_step(store, prices, call, status="error", http_status=upstream.status,
                                      usage=usage or Usage(input=call.input_estimate), estimated=usage is None,
                                      error="the answer could not be translated")
                    raise FailedAttempt(Failure("answer not translatable", status=upstream.status)) from None
                call.translated(answer.warnings)
                parsed, payload = answer.body, orjson.dumps(answer.body)
            tool_calls = call.fmt.tool_calls(parsed)
            blocked = blocked_tool(call, tool_calls)
            note_shadowed_tools(call, tool_calls)
            gated, then = hold_if_gated(call, tool_calls, upstream.status, headers, payload, stream=False) \
                if blocked is None else (None, ())
            status = "blocked" if blocked is not None else "held" if gated is not None else "ok"
            await settle_step(store, prices, call, status=status, http_status=upstream.status,
                              usage=usage if usage is not None else Usage(input=call.input_estimate),
                              estimated=usage is None, error=None if usage else "usage missing from the answer",
                              tool_calls=tool_calls, then=then)
            if blocked is not None:  # the answer calls a blocked tool: it is paid for, but not delivered
                raise tool_refusal(call, blocked)
            if gated is not None:  # the answer calls a gated tool: paid for, held until approved
                return await await_approval(request, call, gated)
        headers.update(rungate_headers(call))
        return web.Response(body=payload, status=upstream.status, headers=headers)


def _read_answer(fmt: WireFormat, payload: bytes) -> tuple[Any, Usage | None]:
    """A plain answer as JSON (None when it is not) and its usage.

    A large embeddings answer is not read whole: its vectors are nearly all of it (16 MB of floats took 79 ms
    of the loop and 222 MB to read), and what Rungate needs of it is the usage object at its end. `{}` then
    stands for the answer, which holds no tool calls and is never translated. When its usage is not found
    that way, it is read whole.
    """
    if fmt is EMBEDDINGS and len(payload) > LARGE_ANSWER_BYTES:
        usage = embeddings_usage_at_end(payload)
        if usage is not None:
            return {}, usage
    parsed = _json_or_none(payload)
    return parsed, fmt.usage(parsed)


def _json_or_none(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
