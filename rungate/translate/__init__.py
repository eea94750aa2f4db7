"""Faithful translation between the OpenAI and Anthropic wire formats (pure, no I/O).

When a call fails over to a target of the other vendor, the request is translated into the target's
format, and its answer (a body, a stream, or an error) back into the format the agent sent, so the agent
never sees the other vendor. The modules:

- `common`            shared vocabulary: `Translated`, `Untranslatable`, stop-reason and usage mappings, tool
                      names and ids, text blocks, defensive readers of untrusted JSON
- `requests`          request bodies: OpenAI chat <-> Anthropic messages (entry points, prefill), built from
  - `request_fields`    top-level fields: field readers, dropped fields, tools, tool_choice, reasoning, formats
  - `request_messages`  the conversation history, turn by turn
  - `request_content`   content parts: text, images, documents
- `answers`           non-stream answers: Anthropic message <-> OpenAI chat completion
- `errors`            error statuses and bodies in the caller's format
- `streams`           SSE streams, event by event: Anthropic -> OpenAI chat chunks, OpenAI chat chunks -> Anthropic
- `continuation`      the client side of a stream, and stitching a second upstream into it after a break
- `responses`         OpenAI Responses requests served by Anthropic: request and answer, with
  - `responses_input`   `input` items and content parts -> Anthropic turns
  - `responses_output`  the Responses output shapes (response object, items, usage) both answer paths build
  - `responses_stream`  Anthropic streams -> Responses stream events (`MessagesToResponses`)

Contracts shared by every module:

- Inputs are decoded JSON the agent or a provider sent; nothing here trusts their shapes. A request that
  cannot be carried across faithfully (e.g. `n > 1`, audio input, a provider-specific `file_id`) raises
  `Untranslatable`, which the proxy treats as "this target cannot serve the call" (the call fails over
  past it, or gets a 400 in the agent's format when no target can).
- Whatever is dropped deliberately (thinking blocks into OpenAI, sampling knobs the target lacks) is named
  in `Translated.warnings`, one short human-readable sentence each; the proxy reports them in
  `x-rungate-warning` and records them as an event.
- Usage is carried as each provider means it (`rungate.usage.Usage` in the middle): an OpenAI client served
  by Anthropic sees `prompt_tokens` = input + cache reads + cache writes, never Anthropic's bare
  `input_tokens`.
- Tool-call ids pass through unchanged where the target accepts them, so a tool loop can go on across a
  failover with the ids the agent was given.
"""
