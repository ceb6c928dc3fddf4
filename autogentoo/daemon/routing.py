"""The route table: every endpoint with its role, its input schema and its docs.

A handler is registered with the role it needs and the dataclasses its body
and query string parse into. One wrapper, the same for every route, resolves
the caller, checks the role and parses input before any handler code runs:
policy is decided in one place, on the normalised request. The OpenAPI
document is generated from the same table, so it cannot drift from what the
routes accept.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Union, get_args, get_origin

from aiohttp import web

from autogentoo.daemon.auth import Caller, require
from autogentoo.daemon.config import Role
from autogentoo.errors import BadRequest, Code, InvalidArgument
from autogentoo.names import NAME_PATTERN, check_name

# --- input schemas --------------------------------------------------------


def name_field(what: str, *, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field holding a validated name (root, snapshot, overlay...)."""

    def check(v: Any) -> str:
        return check_name(v, what)

    meta = {"check": check, "pattern": NAME_PATTERN, "doc": what}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def doc_field(doc: str, *, default: Any = dataclasses.MISSING, check: Any = None) -> Any:
    meta: dict[str, Any] = {"doc": doc}
    if check is not None:
        meta["check"] = check
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, list | dict):
        return field(default_factory=partial(copy.copy, default), metadata=meta)
    return field(default=default, metadata=meta)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(tp: Any, value: Any, where: str, from_query: bool) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise InvalidArgument(f"{where} must not be null", field=where)
    tp = inner
    origin = get_origin(tp)
    if tp is bool:
        if from_query and isinstance(value, str) and value in ("1", "true", "0", "false"):
            return value in ("1", "true")
        if isinstance(value, bool):
            return value
    elif tp is int:
        if from_query and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if from_query and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidArgument(f"{where} must not contain NUL bytes", field=where)
            return value
    elif origin is list:
        (item,) = get_args(tp)
        if isinstance(value, list):
            return [_coerce(item, v, f"{where}[{i}]", False) for i, v in enumerate(value)]
    elif origin is dict:
        _, vt = get_args(tp)
        if isinstance(value, dict):
            return {
                _coerce(str, k, f"{where} key", False): _coerce(vt, v, f"{where}.{k}", False)
                for k, v in value.items()
            }
    raise InvalidArgument(f"{where} must be {_type_name(tp)}", field=where)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "an object"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def parse_into(cls: type[Any], data: Any, *, from_query: bool = False) -> Any:
    """Build dataclass `cls` from untrusted JSON (or query) data; unknown keys are refused."""
    what = "query" if from_query else "body"
    if not isinstance(data, dict):
        raise BadRequest(f"the request {what} must be a JSON object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        accepted = ", ".join(sorted(fields)) or "none"
        raise InvalidArgument(
            f"unknown {what} field {unknown[0]!r} (accepted: {accepted})", field=unknown[0]
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InvalidArgument(f"missing {what} field {name!r}", field=name)
            continue
        value = _coerce(hints[name], data[name], name, from_query)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            value = [check(v) for v in value] if isinstance(value, list) else check(value)
        kwargs[name] = value
    return cls(**kwargs)


def json_schema(tp: Any) -> dict[str, Any]:
    optional, tp = _is_optional(tp)
    origin = get_origin(tp)
    schema: dict[str, Any]
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props: dict[str, Any] = {}
        required = []
        for f in dataclasses.fields(tp):
            props[f.name] = json_schema(hints[f.name])
            if "doc" in f.metadata:
                props[f.name]["description"] = f.metadata["doc"]
            if "pattern" in f.metadata:
                props[f.name]["pattern"] = f.metadata["pattern"]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
            elif f.default is not dataclasses.MISSING and f.default is not None:
                props[f.name]["default"] = f.default
        schema = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            schema["required"] = required
    elif origin is list:
        schema = {"type": "array", "items": json_schema(get_args(tp)[0])}
    elif origin is dict:
        schema = {"type": "object", "additionalProperties": json_schema(get_args(tp)[1])}
    else:
        schema = {
            bool: {"type": "boolean"},
            int: {"type": "integer"},
            float: {"type": "number"},
            str: {"type": "string"},
        }[tp]
    if optional:
        schema = {**schema, "nullable": True}
    return schema


# --- the table -------------------------------------------------------------


@dataclass
class Ctx:
    """What a handler gets: the request, the caller, and its parsed input."""

    request: web.Request
    caller: Caller
    body: Any
    query: Any
    request_id: str

    def param(self, key: str, what: str) -> str:
        return check_name(self.request.match_info[key], what)

    def int_param(self, key: str, what: str) -> int:
        raw = self.request.match_info[key]
        # isdigit() alone accepts "¹" and other digits int() refuses.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise InvalidArgument(f"{what} must be a number, not {raw[:40]!r}", field=what)
        return int(raw)


Handler = Callable[[Ctx], Awaitable[Any]]
CallerOf = Callable[[web.Request], Caller]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: Role
    handler: Handler
    summary: str
    body: type[Any] | None = None
    query: type[Any] | None = None
    # Request body is a raw byte stream (an upload), not JSON.
    upload: bool = False
    # Response content type when not JSON (a log or artefact stream).
    produces: str = "application/json"
    tags: tuple[str, ...] = ()

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


@dataclass
class Router:
    routes: list[Route] = field(default_factory=list)

    def route(
        self,
        method: str,
        path: str,
        *,
        role: Role,
        summary: str,
        body: type[Any] | None = None,
        query: type[Any] | None = None,
        upload: bool = False,
        produces: str = "application/json",
        tag: str = "",
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes.append(
                Route(
                    method,
                    path,
                    role,
                    handler,
                    summary,
                    body,
                    query,
                    upload,
                    produces,
                    (tag,) if tag else (),
                )
            )
            return handler

        return register

    def install(
        self, app: web.Application, caller_of: CallerOf, policy_of: Callable[[], Any]
    ) -> None:
        for route in self.routes:
            app.router.add_route(route.method, route.path, _wrap(route, caller_of, policy_of))


REQUEST_ID = web.RequestKey("request_id", str)


def _wrap(route: Route, caller_of: CallerOf, policy_of: Callable[[], Any]) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        caller = caller_of(request)
        require(caller, route.role, policy_of())
        query = None
        if route.query is not None:
            query = parse_into(route.query, dict(request.query), from_query=True)
        elif request.query:
            raise InvalidArgument(
                f"unknown query parameter {next(iter(request.query))!r}",
                field=next(iter(request.query)),
            )
        body = None
        if route.body is not None:
            body = parse_into(route.body, await _read_json(request))
        elif not route.upload and request.can_read_body:
            raw = await request.read()
            if raw.strip() not in (b"", b"{}"):
                raise InvalidArgument("this endpoint takes no request body")
        ctx = Ctx(request, caller, body, query, str(request.get(REQUEST_ID, "-")))
        result = await route.handler(ctx)
        if isinstance(result, web.StreamResponse):
            return result
        return web.json_response(result, dumps=_dumps)

    handle.__name__ = route.operation_id
    setattr(handle, "autogentoo_route", route)  # noqa: B010 - read back by tests and docs
    return handle


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


async def _read_json(request: web.Request) -> Any:
    ctype = request.headers.get("Content-Type", "application/json")
    if request.can_read_body and not ctype.startswith("application/json"):
        raise BadRequest(
            f"expected Content-Type application/json, got {ctype!r}",
            code=Code.UNSUPPORTED_MEDIA_TYPE,
        )
    raw = await request.read() if request.can_read_body else b""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None


def openapi(router: Router, version: str) -> dict[str, Any]:
    error_schema = {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "enum": [c.value for c in Code]},
            "message": {"type": "string"},
            "details": {"type": "object"},
            "request_id": {"type": "string"},
        },
    }
    paths: dict[str, Any] = {}
    for r in router.routes:
        op: dict[str, Any] = {
            "operationId": r.operation_id,
            "summary": r.summary,
            "x-required-role": str(r.role),
            "tags": list(r.tags),
            "responses": {
                "200": {"description": "success", "content": {r.produces: {}}},
                "default": {
                    "description": "an error with a stable code",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            },
        }
        params = []
        for seg in r.path.split("/"):
            if seg.startswith("{") and seg.endswith("}"):
                name = seg[1:-1].split(":")[0]
                params.append(
                    {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                )
        if r.query is not None:
            schema = json_schema(r.query)
            for pname, pschema in schema["properties"].items():
                params.append(
                    {
                        "name": pname,
                        "in": "query",
                        "required": pname in schema.get("required", []),
                        "schema": pschema,
                    }
                )
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": json_schema(r.body)}},
            }
        elif r.upload:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        path = "/".join(
            seg.split(":")[0] + ("}" if ":" in seg else "") for seg in r.path.split("/")
        )
        paths.setdefault(path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "autogentoo daemon API", "version": version},
        "paths": paths,
        "components": {"schemas": {"Error": error_schema}},
    }
