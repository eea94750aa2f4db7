"""Check HTTP answers against `openapi/rungate.yaml`, from any test.

    validate_response("GET", "/api/runs/{run_id}", 200, body)      # AssertionError on drift
    validate_headers("POST", "/v1/chat/completions", 200, resp.headers)
    validate_schema("EventLine", line)
    documented_routes()                                             # {("GET", "/api/runs"), …}

OpenAPI 3.1 schemas are JSON Schema 2020-12 (the document says so in `jsonSchemaDialect`), so the whole
document is registered as one 2020-12 resource and each schema is validated through a `$ref` pointing
into it: every `#/components/...` reference inside resolves against the same document.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from rungate.openapi import load_spec

SPEC_URI = "urn:rungate:openapi"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def pointer(*parts: str) -> str:
    """A JSON pointer (`/paths/~1api~1runs/get`) from unescaped segments."""
    return "".join("/" + _escape(p) for p in parts)


def resolve_pointer(ptr: str) -> Any:
    """The node of the spec at JSON pointer `ptr` (`#` prefix optional); AssertionError when absent."""
    node: Any = load_spec()
    for raw in ptr.lstrip("#").split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            assert part.isdigit() and int(part) < len(node), f"$ref #{ptr} does not resolve (at {part!r})"
            node = node[int(part)]
        else:
            assert isinstance(node, dict) and part in node, f"$ref #{ptr} does not resolve (at {part!r})"
            node = node[part]
    return node


def _deref(node: Any, ptr: str) -> tuple[Any, str]:
    """Follow (non-schema) `$ref`s such as `#/components/responses/X`; returns the node and its pointer."""
    seen: set[str] = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert isinstance(ref, str) and ref.startswith("#/"), f"only local $refs are supported, got {ref!r}"
        assert ref not in seen, f"$ref cycle at {ref}"
        seen.add(ref)
        ptr = ref[1:]
        node = resolve_pointer(ptr)
    return node, ptr


@cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = DRAFT202012.create_resource(load_spec())
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, resource)
    return registry


@cache
def _validator(ptr: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{SPEC_URI}#{ptr}"}, registry=_registry())


def _check(ptr: str, value: Any, what: str) -> None:
    errors = list(_validator(ptr).iter_errors(value))
    if errors:
        error = best_match(errors)
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        shown = repr(value)
        shown = shown if len(shown) <= 800 else shown[:800] + "…"
        raise AssertionError(f"{what} does not match the OpenAPI schema at #{ptr}: at {where}: {error.message}"
                             f" ({len(errors)} error(s))\nvalue: {shown}")


def documented_routes() -> set[tuple[str, str]]:
    """Every (METHOD, path template) the document describes."""
    return {(method.upper(), path) for path, item in load_spec()["paths"].items()
            for method in item if method in HTTP_METHODS}


def operation(method: str, path_template: str) -> tuple[dict[str, Any], str]:
    """The operation object for `method path_template` and its JSON pointer; AssertionError when undocumented."""
    paths = load_spec()["paths"]
    item = paths.get(path_template)
    assert item is not None, f"{path_template} is not documented in openapi/rungate.yaml"
    op = item.get(method.lower())
    assert op is not None, f"{method.upper()} {path_template} is not documented in openapi/rungate.yaml"
    return op, pointer("paths", path_template, method.lower())


def response_object(method: str, path_template: str, status: int) -> tuple[dict[str, Any], str]:
    """The (dereferenced) response object documented for `status` (exact, then `4XX`, then `default`)."""
    op, op_ptr = operation(method, path_template)
    responses = op.get("responses", {})
    for key in (str(status), f"{str(status)[0]}XX", "default"):
        if key in responses:
            return _deref(responses[key], op_ptr + pointer("responses", key))
    raise AssertionError(f"{method.upper()} {path_template} documents no response for status {status}"
                         f" (documented: {', '.join(sorted(responses))})")


def validate_response(method: str, path_template: str, status: int, body: Any,
                      content_type: str | None = None) -> None:
    """Raise AssertionError unless `body` (parsed JSON) matches the schema documented for this answer.

    `content_type` picks the media type (default: `application/json`, else the only one documented);
    for NDJSON pass `application/x-ndjson` and validate each line separately.
    """
    response, ptr = response_object(method, path_template, status)
    content = response.get("content")
    assert content, f"{method.upper()} {path_template} {status}: the document describes no body"
    if content_type is None:
        content_type = "application/json" if "application/json" in content else next(iter(content))
    assert content_type in content, (f"{method.upper()} {path_template} {status}: no {content_type} body documented"
                                     f" (documented: {', '.join(content)})")
    media = content[content_type]
    assert "schema" in media, f"{method.upper()} {path_template} {status} {content_type}: no schema"
    _check(ptr + pointer("content", content_type, "schema"), body,
           f"{method.upper()} {path_template} → {status} ({content_type})")


def validate_headers(method: str, path_template: str, status: int, headers: Mapping[str, str]) -> None:
    """Raise AssertionError unless every required documented header is present and every documented one valid.

    Header names compare case-insensitively; values are validated as the raw strings sent on the wire.
    """
    response, ptr = response_object(method, path_template, status)
    present = {name.lower(): value for name, value in headers.items()}
    for name, header in response.get("headers", {}).items():
        header_obj, header_ptr = _deref(header, ptr + pointer("headers", name))
        value = present.get(name.lower())
        if value is None:
            assert not header_obj.get("required", False), (
                f"{method.upper()} {path_template} → {status}: required header {name} is missing"
                f" (got: {', '.join(sorted(present))})")
            continue
        if "schema" in header_obj:
            _check(header_ptr + "/schema", value, f"{method.upper()} {path_template} → {status} header {name}")


def validate_schema(name: str, value: Any) -> None:
    """Raise AssertionError unless `value` matches `components/schemas/<name>`."""
    schemas = load_spec()["components"]["schemas"]
    assert name in schemas, f"components/schemas/{name} is not documented"
    _check(pointer("components", "schemas", name), value, f"components/schemas/{name}")
