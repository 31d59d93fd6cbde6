"""The HTTP routes: ``POST /infer`` (JSON ``{"image": base64}`` or a multipart ``file``), ``POST /infer/batch``,
``GET /health``, ``GET /model``, ``GET /metrics``. Each only parses the request and hands it to the
scoring service."""

from __future__ import annotations

import difflib
import functools
import json
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from insightad.apps.serve.codec import holds_base64_image
from insightad.apps.serve.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    Health,
    InferRequest,
    InferResponse,
    ModelInfo,
)
from insightad.apps.serve.service import ScoringService
from insightad.data.images import header_pixels
from insightad.errors import InsightADError

ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad base64, not an image, truncated image, too many pixels"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when the server has one)"},
    413: {"model": ErrorResponse, "description": "request body over the size limit"},
    422: {"model": ErrorResponse, "description": "invalid JSON or a missing field"},
    429: {"model": ErrorResponse, "description": "this client already has --max-requests-per-client requests open "
                                                 "(retry later)"},
    503: {"model": ErrorResponse, "description": "inference queue full (retry later) or shutting down"},
}


UTF8_BOM = b"\xef\xbb\xbf"
TO_BATCH = " (several images go to POST /infer/batch as {\"images\": [...]})"
EXPECTED_BODY = {"InferRequest": "{\"image\": \"<base64 of the file>\"} or a multipart upload in field 'file' "
                                 "(curl -F file=@part.png)",
                 "BatchRequest": "{\"images\": [\"<base64 of each file>\"]}"}


def _parse_json(model: type[BaseModel], body: bytes, max_images: int | None = None) -> Any:
    """The request body as ``model``; a UTF-8 byte order mark in front is ignored (RFC 8259 allows it: Windows
    PowerShell 5 writes one into every UTF-8 file, and 'Invalid JSON at line 1 column 1' did not say why)."""
    if body.startswith(UTF8_BOM):
        body = body[len(UTF8_BOM):]
    if not body.strip(b" \t\r\n"):  # curl without -d, a client that lost its body: 'EOF while parsing a value'
        raise RequestValidationError([{"loc": ("body",), "type": "missing", "msg": "the request body is empty; "
                                       f"expected {EXPECTED_BODY[model.__name__]}"}])
    try:
        parsed = (lenient_batch(max_images) if max_images else LENIENT[model]).model_validate_json(body)
    except ValidationError as e:
        too_long = [err for err in e.errors(include_input=False) if err["type"] == "too_long"]
        if too_long:  # the list is refused as a whole, before its items: 2 million numbers made 2 million errors
            got = too_long[0].get("ctx", {}).get("actual_length")
            raise HTTPException(413, too_many_images(max_images or 0, got)) from None
        what = not_json(body)
        if what:  # it was 'Invalid JSON: expected value at line 1 column 1', which did not say why
            raise RequestValidationError([{"loc": ("body",), "type": "json_invalid", "msg": f"{what}, not JSON in "
                                           f"UTF-8; expected {EXPECTED_BODY[model.__name__]}"}]) from None
        said_json = " ".join(str(err.get("msg")) for err in e.errors() if err["type"] == "json_invalid")
        found = (bad_escape(body) if "escape" in said_json else  # 'unexpected end of hex escape' to a lone surrogate
                 raw_control(body) if "control character" in said_json else  # ... 'at line 2 column 0'
                 python_literal(body) if PYTHON_SAID.search(said_json) else  # 'key must be a string' to {'image': ..}
                 trailing(model, said_json) if "trailing characters" in said_json else None)
        if found:
            raise RequestValidationError([{"loc": ("body", *found[0]), "type": "json_invalid",
                                           "msg": f"Invalid JSON: {found[1]}"}]) from None
        given = [err["input"] for err in e.errors() if err["type"] == "missing" and isinstance(err.get("input"), dict)]
        refuse_misnamed_fields(model, given[0] if given else {})
        raise RequestValidationError([{**err, "loc": ("body", *err.get("loc", ())), "msg": said(err, model)}
                                      for err in e.errors()]) from None
    refuse_misnamed_fields(model, parsed.model_extra or {})
    repeated = repeated_fields(model, body)
    if repeated:
        raise RequestValidationError([{"loc": ("body", name), "type": "duplicate_key",
                                       "msg": "given more than once; expected once (JSON readers disagree on which "
                                              "copy counts)"} for name in repeated])
    return parsed


JSON_TYPES = {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object",
              type(None): "null"}


def said(err: Any, model: type[BaseModel]) -> str:
    """The message of a validation error, saying what JSON type came where another was expected: pydantic said
    'Input should be a valid boolean' to ``"heatmap": "true"`` (not that the quotes were the trouble), and 'Input
    should be a valid string' or 'a valid list' to an image sent as null or ``"images": "<base64>"``, and 'Input
    should be an object' to a body that is a JSON string or array."""
    kind, value = err.get("type"), err.get("input")
    what = JSON_TYPES.get(type(value), "another value")
    if kind == "model_type":  # the body itself: a bare string (json.dumps of the base64), an array
        return f"expected a JSON object {EXPECTED_BODY[model.__name__].split(' or ')[0]}, got {what}"
    if kind == "string_type":
        return f"expected a JSON string (the base64 of an encoded image), got {what}" + (
            TO_BATCH if isinstance(value, list) and model is InferRequest else "")
    if kind == "list_type":
        return f"expected a JSON array of base64 strings, got {what}" + (
            " (put it in [ ], or send one image to POST /infer as {\"image\": ...})" if isinstance(value, str) else "")
    if kind == "too_short" and isinstance(value, list) and not value:  # 'List should have at least 1 item after ...'
        return "an empty array; expected at least one base64 image"
    if kind != "bool_type":
        return str(err.get("msg", ""))
    if isinstance(value, str):
        what += f" ({value[:20]!r}: write true or false without quotes)" if value.lower() in ("true", "false") else \
            f" ({value[:20]!r})"
    return f"expected JSON true or false, got {what}"


class _LenientInfer(InferRequest):
    model_config = ConfigDict(extra="allow")  # the fields it does not know are kept, to be looked at


class _LenientBatch(BatchRequest):
    model_config = ConfigDict(extra="allow")


LENIENT: dict[type[BaseModel], type[BaseModel]] = {InferRequest: _LenientInfer, BatchRequest: _LenientBatch}


@functools.lru_cache(maxsize=8)
def lenient_batch(max_images: int) -> type[BaseModel]:
    """The batch body with at most ``max_images`` images: pydantic then refuses a longer list at once, where it
    checked every item first (a 4 MB body of 2 million numbers took 69 s and answered 265 MB of errors)."""
    return create_model("_LenientBatch", __base__=_LenientBatch,
                        images=(list[str], Field(min_length=1, max_length=max_images)))


def too_many_images(limit: int, got: Any) -> str:
    return f"images: at most {limit} images per request (--max-images), got {got}"


OTHER_ROUTE: dict[type[BaseModel], tuple[str, type[BaseModel]]] = {InferRequest: ("POST /infer/batch", BatchRequest),
                                                                  BatchRequest: ("POST /infer", InferRequest)}


def _squash(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


MAX_OTHER_FIELDS = 64  # fields a request body may carry besides its own (clients' metadata)


def refuse_misnamed_fields(model: type[BaseModel], given: dict[str, Any]) -> None:
    """422 for a field name in the body that is not one of ``model``'s but nearly is (``heatmaps``, ``Image``,
    ``heat_map``) or is the other route's (``images`` on /infer): it was ignored, so ``{"image": .., "heatmaps":
    true}`` was answered without its heatmap as if it had not been asked, and ``{"Image": ..}`` was 'image:
    Field required'. Other unknown fields are still ignored (clients may send their own metadata)."""
    names = list(model.model_fields)
    if len(given) > MAX_OTHER_FIELDS:  # each is compared with the field names: a million took 16 s of a decode thread
        raise RequestValidationError([{"loc": ("body",), "type": "too_many_fields", "msg": f"{len(given)} fields "
                                       f"besides this request's own ({', '.join(names)}); expected at most "
                                       f"{MAX_OTHER_FIELDS} fields of your own"}])
    route, other = OTHER_ROUTE[model]

    def of_the_other_route(key: str) -> str | None:
        if any(_squash(n) == _squash(key) for n in other.model_fields):
            return f"a field of {route}, not of this route; expected {EXPECTED_BODY[model.__name__]}"
        return None

    refuse_misnamed(given, names, "request", of_the_other_route,
                    {"image": " (several images go to POST /infer/batch as 'images')"})


def refuse_misnamed(keys: Any, names: Sequence[str], what: str, elsewhere: Callable[[str], str | None],
                    hints: dict[str, str] | None = None) -> None:
    """422 naming, for each of ``keys`` that is not one of ``names``: the field meant where it differs in case or
    punctuation only (``Image``, ``heat_map``), else ``elsewhere(key)`` (the field of another request), else the
    name it nearly is (``heatmaps``, ``imgae``; ``hints`` adds to a name's message); any other key is ignored."""
    errors = []
    for key in keys:
        if key in names:
            continue
        same = [n for n in names if _squash(n) == _squash(key)]
        if same:
            msg = f"not a field of this {what}; did you mean {same[0]!r}? (names are case-sensitive)"
        elif (other := elsewhere(key)) is not None:
            msg = other
        elif near := difflib.get_close_matches(key, names, 1, 0.8):  # heatmaps, imgae, image2 (not image_id, img)
            msg = f"not a field of this {what}; did you mean {near[0]!r}?" + (hints or {}).get(near[0], "")
        else:
            continue
        errors.append({"loc": ("body", key[:40]), "type": "unknown_field", "msg": msg})
    if errors:
        raise RequestValidationError(errors)


MULTIPART_HEAD = re.compile(rb"\s*--\S{1,200}\r?\ncontent-disposition: *form-data", re.IGNORECASE)


def not_json(body: bytes) -> str | None:
    """What a body that is not JSON in UTF-8 is, when it can be told: an image file (``curl --data-binary
    @part.png``), UTF-16 / UTF-32 text (.NET's ``Encoding.Unicode``, a PowerShell file) or JSON in another 8-bit
    encoding (it was 'invalid unicode code point at line 1 column 40'); else None."""
    if header_pixels(body) is not None:
        return "an image file sent as the body"
    if MULTIPART_HEAD.match(body[:512]):  # an upload whose Content-Type header was replaced or dropped
        return "a multipart/form-data upload without its Content-Type: multipart/form-data; boundary=... header"
    if body.lstrip()[:5].lower() == b"data:" or holds_base64_image(body.strip()):  # curl -d @part.b64
        return "an image's base64 (or data: URL) sent as the body without the JSON around it"
    encoding = json.detect_encoding(body)  # from a byte order mark or the NUL bytes around the first characters
    if not encoding.startswith("utf-8"):
        try:
            text = body.decode(encoding)
        except UnicodeDecodeError:
            return None  # binary that merely starts with a NUL byte: the parser's own message stands
        if text.lstrip("\ufeff \t\r\n")[:1] in ("{", "["):
            return f"{encoding.upper()} text"
    elif body.lstrip(b" \t\r\n")[:1] in (b"{", b"["):  # JSON in Latin-1 or Windows-1252 (a name with an accent)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"text with a byte that is not UTF-8 (0x{body[e.start]:02X} at offset {e.start}: Latin-1 or Windows-1252?)"
    return None


_ESCAPE = re.compile(rb"\\(u[0-9A-Fa-f]{0,4}|.|$)", re.DOTALL)  # a backslash and what it escapes
JSON_ESCAPES = frozenset(b'"\\/bfnrt')


Where = tuple[tuple[str | int, ...], str]  # (the location of a fault in a JSON body, the line saying it)


def bad_escape(body: bytes) -> Where | None:
    """Where ``body``'s first bad backslash escape is (the field whose value holds it, when it can be told) and
    what is wrong with it: a lone UTF-16 surrogate (``"\\ud800"`` not followed by a ``\\udc00``-``\\udfff`` one,
    or a trailing one alone) was 'unexpected end of hex escape' or 'lone leading surrogate', a ``\\u`` with fewer
    than 4 hex digits or ``\\x`` 'invalid escape'; else None."""
    pending: re.Match[bytes] | None = None  # a leading surrogate, waiting for its trailing half
    for m in _ESCAPE.finditer(body):
        text = m.group(1)
        unit = int(text[1:], 16) if text[:1] == b"u" and len(text) == 5 else None
        if pending is not None:
            if unit is not None and 0xDC00 <= unit <= 0xDFFF and m.start() == pending.end():
                pending = None
                continue
            return _escape_error(body, pending, "a lone UTF-16 surrogate: \\ud800-\\udbff encodes half a character "
                                 "and must be followed at once by a \\udc00-\\udfff escape, its other half")
        if unit is not None and 0xD800 <= unit <= 0xDBFF:
            pending = m
        elif unit is not None and 0xDC00 <= unit <= 0xDFFF:
            return _escape_error(body, m, "a lone UTF-16 surrogate: \\udc00-\\udfff is the second half of a "
                                 "character and must come right after a \\ud800-\\udbff escape")
        elif text[:1] == b"u" and unit is None:
            return _escape_error(body, m, "a \\u escape needs 4 hex digits (\\u00e9)")
        elif text[:1] != b"u" and (not text or text[0] not in JSON_ESCAPES):
            return _escape_error(body, m, "not a JSON escape (JSON has \\\" \\\\ \\/ \\b \\f \\n \\r \\t and "
                                 "\\uXXXX)")
    if pending is not None:
        return _escape_error(body, pending, "a lone UTF-16 surrogate: \\ud800-\\udbff encodes half a character and "
                             "must be followed at once by a \\udc00-\\udfff escape, its other half")
    return None


def _escape_error(body: bytes, m: re.Match[bytes], what: str) -> Where:
    return _found_at(body, m.start(), f"bad escape '{m.group(0).decode('ascii', 'backslashreplace')}'", what)


def _found_at(body: bytes, at: int, found: str, what: str, field: str | None = None) -> Where:
    """(the location of the field holding offset ``at`` (in a string, unless ``field`` is given), 'FOUND in the
    value of FIELD at line L column C: WHAT')."""
    line, line_start = body.count(b"\n", 0, at) + 1, body.rfind(b"\n", 0, at) + 1
    column = len(body[line_start:at].decode("utf-8", "replace")) + 1  # in characters, as the parser counts
    held = (field, None) if field else _field_holding(body, at)
    if held is None:
        return (), f"{found} at line {line} column {column}: {what}"
    key, item = held
    where = f" in the value of {key!r}" if item is None else f" in item {item} of {key!r}"
    loc: tuple[str | int, ...] = (key,) if item is None else (key, item)
    return loc, f"{found}{where} at line {line} column {column}: {what}"


PYTHON_SAID = re.compile(r"key must be a string|expected value|expected ident")
_SINGLE_QUOTED = re.compile(rb"\s*[\[{]\s*'")
_UNQUOTED_KEY = re.compile(rb"\s*\{\s*[A-Za-z_]")
_PY_LITERAL = re.compile(rb"[:\[,]\s*(True|False|None)\s*[,}\]]")
NOT_STR = "written with Python's str() or repr(), not json.dumps?"


def python_literal(body: bytes) -> Where | None:
    """What a body written as a Python literal instead of JSON has wrong, and where: ``{'image': ...}`` was 'key
    must be a string at line 1 column 2' (it is a string, in Python) and ``"heatmap": True`` 'expected value'."""
    m = _SINGLE_QUOTED.match(body)
    if m:
        return _found_at(body, m.end() - 1, "a single quote", f"JSON strings take double quotes ({NOT_STR})")
    m = _UNQUOTED_KEY.match(body)
    if m:
        return _found_at(body, m.end() - 1, "a key without quotes", "JSON keys take double quotes "
                         "({\"image\": ...})")
    m = _PY_LITERAL.search(body)
    if m:
        key = _KEY_BEFORE.search(body[max(0, m.start(1) - 100):m.start(1)])
        return _found_at(body, m.start(1), m.group(1).decode(), f"JSON writes true, false and null in lower case "
                         f"({NOT_STR})", key.group(1).decode("utf-8", "replace") if key else None)
    return None


def trailing(model: type[BaseModel], said_json: str) -> Where:
    """'trailing characters at line 2 column 1' said as what it is: a second value after the object (two requests
    in one body, a line of NDJSON)."""
    where = said_json[said_json.find(" at line"):] if " at line" in said_json else ""
    more = TO_BATCH if model is InferRequest else ""
    return (), (f"more follows the end of the JSON object{where}; expected one JSON object per request{more}")


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)  # a JSON string (to the end, if not closed)
_CONTROL = re.compile(rb"[\x00-\x1f]")
CONTROL_NAMES = {0x0A: "a line break (LF)", 0x0D: "a line break (CR)", 0x09: "a tab"}


def raw_control(body: bytes) -> Where | None:
    """Where the first control character written as it is inside a JSON string is, and what to do: base64 as
    ``base64`` writes it by default (a line break every 76 characters) put in a JSON string was 'control
    character (\\u0000-\\u001F) found while parsing a string at line 2 column 0'; else None."""
    for m in _STRING.finditer(body):
        c = _CONTROL.search(m.group(0))
        if c is None:
            continue
        byte = c.group(0)[0]
        name = CONTROL_NAMES.get(byte, f"the control character 0x{byte:02X}")
        escaped = {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}.get(byte, f"\\u{byte:04x}")
        loc, said = _found_at(body, m.start() + c.start(), name, "a JSON string cannot hold one as it is; write it "
                              f"as {escaped}")
        if loc[:1] in ((), ("image",), ("images",)) and byte in (0x0A, 0x0D):
            said += ", or send the base64 on one line (base64 -w0)"
        return loc, said
    return None


_KEY_BEFORE = re.compile(rb'"([^"\\]{1,60})"\s*:\s*$')
_ARRAY_BEFORE = re.compile(rb'"([^"\\]{1,60})"\s*:\s*\[$')


def _string_start(body: bytes, at: int) -> int:
    """Offset of the quote opening the JSON string that holds offset ``at`` (the last unescaped quote before
    it), or -1."""
    quote = at
    while (quote := body.rfind(b'"', 0, quote)) >= 0:
        slashes = 0
        while quote - slashes > 0 and body[quote - slashes - 1] == 0x5C:  # backslashes right before it
            slashes += 1
        if slashes % 2 == 0:
            break
    return quote


def _field_holding(body: bytes, at: int) -> tuple[str, int | None] | None:
    """(the key whose string value holds offset ``at``, None), or for an item of an array of strings (a batch's
    ``images``) (its key, the item's index, counted by the commas before it); else None (a key)."""
    quote = _string_start(body, at)
    if quote < 0:
        return None
    m = _KEY_BEFORE.search(body[max(0, quote - 100):quote])
    if m:
        return m.group(1).decode("utf-8", "replace"), None
    bracket = body.rfind(b"[", 0, quote)
    if bracket < 0 or b"]" in body[bracket:quote] or b"{" in body[bracket:quote]:
        return None
    m = _ARRAY_BEFORE.search(body[max(0, bracket - 100):bracket + 1])
    if not m:
        return None
    return m.group(1).decode("utf-8", "replace"), body.count(b",", bracket, quote)


def repeated_fields(model: type[BaseModel], body: bytes) -> list[str]:
    """The fields of ``model`` that the JSON object ``body`` gives more than once. The parser kept the last copy
    and a proxy or logger in front may read the first: ``{"image": A, "image": B}`` was scored as B, silently.
    A key can be spelled with ``\\u`` escapes, so the body is parsed again only when it has one or names a field
    twice (a base64 string holds neither)."""
    names = list(model.model_fields)
    if b"\\u" not in body and all(body.count(f'"{name}"'.encode()) <= 1 for name in names):
        return []
    top = json.loads(body, object_pairs_hook=lambda pairs: pairs,  # the top-level object as its (key, value) pairs
                     parse_int=str, parse_float=str)  # (numbers kept as text, never converted)
    keys = [key for key, _ in top]
    return [name for name in names if keys.count(name) > 1]


def _json_body_doc(model: type[BaseModel], multipart: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": model.model_json_schema()}}
    if multipart:
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary", "description": "an image file"},
                           "heatmap": {"type": "boolean", "default": False}}}}
    return {"requestBody": {"required": True, "content": content}}


UPLOAD_EXPECTED = "expected multipart/form-data with the image file in field 'file' (and an optional 'heatmap')"


class FormFieldRefused(MultiPartException):
    """A well-formed upload refused for what one of its fields holds: a 422 naming the field, not 'not valid'."""

    def __init__(self, field: str | None, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.error = {"loc": ("body", field) if field else ("body",), "type": kind, "msg": msg}


class WholeMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, counting the parts begun and not ended: a body cut inside a part (no closing
    boundary) lost that part silently, and an upload cut inside its image was answered 'file: Field required'."""

    open_parts = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_part_size:  # 'Part exceeded maximum size'
            if part.field_name == "file":  # curl -F 'file=<part.png': the file's bytes as a plain form value
                raise FormFieldRefused("file", "file_expected", "expected a file upload (multipart field 'file' with a "
                                       "filename: curl -F file=@part.png, with @), got a form value over "
                                       f"{self.max_part_size // 1024} KB")
            raise FormFieldRefused(part.field_name[:40], "field_too_long", f"over {self.max_part_size // 1024} KB; "
                                   "expected a short value (heatmap: true or false); the image goes in field 'file' "
                                   "as a file upload (curl -F file=@part.png)")
        super().on_part_data(data, start, end)

    def on_headers_finished(self) -> None:
        try:
            super().on_headers_finished()
        except MultiPartException as e:
            if e.message.startswith("Too many fields"):  # valid multipart with more fields than an upload has
                raise FormFieldRefused(None, "too_many_fields", f"more than {self.max_fields} form fields; expected "
                                       "'file' and an optional 'heatmap'") from None
            raise

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self.open_parts += 1

    def on_part_end(self) -> None:
        super().on_part_end()
        self.open_parts -= 1


async def parse_upload(request: Request) -> FormData:
    """The multipart form of ``request``, read into memory as a JSON body is (the body-size limit bounds both):
    Starlette spooled a file part over 1 MB to a temporary file, so a full disk made a large image a 500.
    Malformed multipart is a 400 saying what was expected."""
    head = bytearray()  # the body's first bytes, to tell what it is when it is not multipart

    async def watched(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        async for chunk in chunks:
            if len(head) < 256:
                head.extend(chunk[:256 - len(head)])
            yield chunk

    try:
        async with aclosing(request.stream()) as stream, aclosing(watched(stream)) as body:
            parser = WholeMultiPartParser(request.headers, body, max_files=1, max_fields=8,
                                          max_part_size=64 * 1024)
            parser.spool_max_size = sys.maxsize  # never rolled over to disk
            form = await parser.parse()
            if parser.open_parts:
                await form.close()
                raise MultiPartException("it ends inside a part, before the closing boundary: a truncated upload")
            return form
    except FormFieldRefused as e:
        raise RequestValidationError([e.error]) from None
    except MultiPartException as e:
        if e.message.startswith("Too many files"):  # valid multipart, more than one file: not 'not valid'
            raise RequestValidationError([{"loc": ("body", "file"), "type": "too_many_files",
                                           "msg": "more than one file in this upload; expected one image file "
                                                  "(several images go to POST /infer/batch as JSON "
                                                  "{\"images\": [<base64 of each>]})"}]) from None
        if e.message.startswith("Missing boundary"):
            raise HTTPException(400, "Content-Type: multipart/form-data without its boundary parameter (one set by "
                                     "hand has none: let the client write it, as curl -F, requests' files= and a "
                                     f"browser's FormData do); {UPLOAD_EXPECTED}") from None
        what = not_multipart(bytes(head), request.headers.get("content-type", "")) or e.message.rstrip(".")
        raise HTTPException(400, f"body: not valid multipart/form-data ({what}); {UPLOAD_EXPECTED}") from None


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def not_multipart(head: bytes, ctype: str) -> str | None:
    """What a body declared as multipart is instead, from its first bytes: JSON ('Invalid multipart data'), or
    parts with another boundary than the header's."""
    start = head.lstrip(b" \t\r\n")
    if start[:1] in (b"{", b"["):
        return "the body is JSON: send JSON with Content-Type: application/json"
    m = _BOUNDARY.search(ctype)
    if m and start.startswith(b"--") and not start.startswith(b"--" + m.group(1).encode("latin-1", "replace")):
        return "the body's parts are separated by another boundary than the one in the Content-Type header"
    return None


async def read_upload(request: Request) -> tuple[bytes, bool]:
    form = await parse_upload(request)
    try:
        refuse_misnamed_form_fields(form)
        upload = form.get("file")
        if upload is None:
            raise RequestValidationError([{"loc": ("body", "file"), "msg": "Field required", "type": "missing"}])
        if not isinstance(upload, UploadFile):
            raise RequestValidationError([{"loc": ("body", "file"), "type": "file_expected",
                                           "msg": "expected a file upload (multipart field 'file' with a filename)"}])
        data = await upload.read()
        if not data:
            raise InsightADError(f"file: the uploaded file {upload.filename!r} is empty")
        if len(form.getlist("heatmap")) > 1:
            raise RequestValidationError([{"loc": ("body", "heatmap"), "type": "duplicate_field",
                                           "msg": "given more than once; expected one true or false"}])
        want = form_switch(form.get("heatmap", "false"), "heatmap")
        return data, want
    finally:
        await form.close()


FORM_FIELDS = ("file", "heatmap")


def refuse_misnamed_form_fields(form: FormData) -> None:
    """422 for a multipart field named nearly as one of the upload's (``heatmaps``, ``File``) or as the JSON
    body's image (``image``, ``images``): ``-F heatmaps=true`` was answered without the heatmap it asked for,
    silently, and ``-F image=@part.png`` was 'file: Field required'. Other fields are ignored as before."""
    refuse_misnamed(dict.fromkeys(form.keys()), FORM_FIELDS, "upload", lambda key: "not a field of this upload; the "
                    "image file goes in field 'file' (curl -F file=@part.png)" if _squash(key) in ("image", "images")
                    else None)


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def form_switch(value: object, field: str) -> bool:
    """A multipart form's on/off field (true/false, 1/0, yes/no, on/off, any case); anything else is a 422 naming
    the field instead of a silent 'off'."""
    word = str(value).strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise RequestValidationError([{"loc": ("body", field), "type": "bool_parsing",
                                       "msg": f"expected true or false (or 1/0, yes/no, on/off), got {str(value)[:40]!r}"}])
    return word in TRUE_WORDS


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


JSON_TYPES_ALSO = frozenset({"text/json", "application/x-json", "text/x-json"})  # older names for JSON


def is_json_type(ctype: str) -> bool:
    """Whether a media type (lower case, no parameters) says JSON: application/json, any ``+json`` type, or one of
    the older names some clients still send (text/json was refused with 415 while application/*+json was read)."""
    return ctype == "application/json" or ctype.endswith("+json") or ctype in JSON_TYPES_ALSO


def _require_json(request: Request) -> None:
    """415 for a body that says it is something other than JSON (text/plain is not parsed as JSON)."""
    ctype = _content_type(request)
    if ctype and not is_json_type(ctype):
        raise HTTPException(415, f"Content-Type {ctype[:60]!r}: expected application/json (or multipart/form-data "
                                 "with a 'file' field on /infer)")


def _require_plain_body(request: Request) -> None:
    """415 for a compressed body (``Content-Encoding: gzip``): it was parsed as it came and answered 'Invalid
    JSON at line 1 column 1' or 'not valid multipart'."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise HTTPException(415, f"Content-Encoding {encoding[:40]!r}: not supported; expected the body "
                                 "uncompressed (images are compressed already)")


BODY_FIELDS = ("image", "images", "heatmap", "file")


def _refuse_fields_in_query(request: Request) -> None:
    """422 for a body field sent in the URL (``POST /infer?heatmap=true``): the query string is not read, and the
    image was answered without its heatmap as if nothing had been asked."""
    given = [name for name in request.query_params if name.lower() in BODY_FIELDS]
    if given:
        raise RequestValidationError([{"loc": ("query", name), "type": "query_not_read",
                                       "msg": "not read from the URL; send it in the JSON body or as a multipart "
                                              "form field"} for name in given])


def client_address(request: Request) -> str:
    """Who sent ``request``, for the per-client limit: the connection's peer address, or the X-Forwarded-For client
    of a proxy named by --trusted-proxies (uvicorn reads the header from those only, ``server.uvicorn_config``)."""
    return request.client.host if request.client else "unknown"


def add_routes(app: FastAPI, service: ScoringService, protected: list[Any]) -> None:
    """Register every route of the API on ``app``."""
    @app.post("/infer", response_model=InferResponse, response_model_exclude_none=True, dependencies=protected,
              responses=ERRORS_DOC, openapi_extra=_json_body_doc(InferRequest, multipart=True),
              summary="Score one image (JSON with base64, or a multipart upload in field 'file')")
    async def infer(request: Request) -> Any:
        _refuse_fields_in_query(request)
        _require_plain_body(request)
        if _content_type(request) == "multipart/form-data":
            async def read_form() -> tuple[list[tuple[str, str | bytes]], bool]:
                data, want = await read_upload(request)
                return [("file", data)], want

            return (await service.score_request(read_form, client_address(request)))[0]

        async def read_json() -> tuple[list[tuple[str, str | bytes]], bool]:
            req = await service.off_loop(_parse_json, InferRequest, await request.body())
            return [("image", req.image)], req.heatmap

        _require_json(request)
        return (await service.score_request(read_json, client_address(request)))[0]

    @app.post("/infer/batch", response_model=BatchResponse, response_model_exclude_none=True,
              dependencies=protected, responses=ERRORS_DOC, openapi_extra=_json_body_doc(BatchRequest, multipart=False),
              summary="Score several images; results in the same order")
    async def infer_batch(request: Request) -> Any:
        _refuse_fields_in_query(request)
        _require_plain_body(request)
        _require_json(request)

        async def read_json() -> tuple[list[tuple[str, str | bytes]], bool]:
            req = await service.off_loop(_parse_json, BatchRequest, await request.body(),
                                         service.settings.max_images)
            if len(req.images) > service.settings.max_images:
                raise HTTPException(413, too_many_images(service.settings.max_images, len(req.images)))
            return [(f"images[{i}]", s) for i, s in enumerate(req.images)], req.heatmap

        return {"results": await service.score_request(read_json, client_address(request))}

    @app.get("/health", response_model=Health, responses={503: {"model": Health}},
             summary="Liveness and readiness: 200 when the model is loaded and the worker runs")
    async def health() -> Any:
        worker = service.worker
        ok = bool(app.state.ready) and worker.alive
        body = {"status": "ok" if ok else "unavailable", "model_loaded": service.det.is_fitted,
                "worker_alive": worker.alive, "queue_depth": worker.pending}
        return body if ok else JSONResponse(body, status_code=503)

    @app.get("/model", response_model=ModelInfo, dependencies=protected,
             summary="The served model: method, backbone, threshold, preprocessing, versions")
    async def model_info() -> Any:
        return service.info

    @app.get("/metrics", dependencies=protected, response_class=Response,
             summary="Prometheus metrics (text exposition format)")
    async def prometheus() -> Response:
        body, ctype = service.metrics.exposition()
        return Response(body, media_type=ctype)

