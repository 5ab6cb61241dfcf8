"""Secrets in the project file's URLs: redacted wherever a URL is shown, scrubbed wherever a spec is
stored, and kept in the environment through `${NAME}` references resolved only where a value is used.

    redact_url("postgresql://bob:pw@db/x?sslpassword=s")  -> "postgresql://bob:***@db/x?sslpassword=***"
    redact_text("POST https://h/x?token=t failed")         -> "POST https://h/x?token=*** failed"
    scrub_url("postgresql://bob:pw@db/x", "EVERLOOP_SQL")  -> "postgresql://bob:${EVERLOOP_SQL_PASSWORD}@db/x"
    resolve_env("postgresql://bob:${PG_PASSWORD}@db/x", "data.source.url") -> the URL with $PG_PASSWORD in it
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Callable

from everloop.errors import SpecError

MARK = "***"
# `${NAME}`: a reference to the environment variable NAME (letters, digits, underscores).
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Query parameters whose values are credentials: token, api_key, access_token, password, sslpassword,
# secret, client_secret, sig, signature, X-Amz-Signature, X-Amz-Credential, auth, code (Azure's function
# key), ... A harmless parameter hidden by mistake costs less than a key shown.
_SECRET_PARAM = re.compile(r"token|key|pass|pwd|secret|sig|credential|auth|code|hmac", re.I)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_url(url: str) -> str:
    """`url` with the password of `scheme://user:password@` and the values of secret-looking query
    parameters replaced by `***`; scheme, user, host, path and other parameters stay readable, and so
    do `${NAME}` references (they hold no secret). A text without `://` (a file path) is returned as is."""
    return _rewrite(url, lambda what: MARK)


def redact_text(text: str) -> str:
    """`text` (a log line, an exception's message) with every URL in it passed through `redact_url`."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def scrub_url(url: str, prefix: str) -> str:
    """`url` as it may be stored: a literal password becomes `${<prefix>_PASSWORD}` and a literal
    secret query parameter `p` becomes `${<prefix>_<P>}` (upper case, `-` as `_`), references the
    value is resolved from where it is used again; `${NAME}` references are kept as written."""
    return _rewrite(url, lambda what: "${" + re.sub(r"\W", "_", f"{prefix}_{what}").upper() + "}")


def scrub_spec(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dumped project file (`ProjectSpec.model_dump(mode="json")`) holding no literal
    secret: data.source's URL and monitoring.webhook pass through `scrub_url` (prefixes EVERLOOP_SQL,
    EVERLOOP_SOURCE and EVERLOOP_WEBHOOK), so the stored spec names the variables to set instead."""
    body = copy.deepcopy(body)
    data, monitoring = body.get("data") or {}, body.get("monitoring") or {}
    source = data.get("source")
    if isinstance(source, dict) and isinstance(source.get("url"), str):
        source["url"] = scrub_url(source["url"], "EVERLOOP_SQL")
    elif isinstance(source, str):
        data["source"] = scrub_url(source, "EVERLOOP_SOURCE")
    if isinstance(monitoring.get("webhook"), str):
        monitoring["webhook"] = scrub_url(monitoring["webhook"], "EVERLOOP_WEBHOOK")
    return body


def missing_env(value: str) -> list[str]:
    """The environment variables `value` references that are not set (in order, each once)."""
    return list(dict.fromkeys(name for name in REFERENCE.findall(value) if name not in os.environ))


def resolve_env(value: str, where: str) -> str:
    """`value` with each `${NAME}` replaced by the environment variable NAME's value, inserted as is
    (a password with URL-special characters is set percent-encoded). `where` names the setting in
    errors. Raises SpecError naming the variables that are not set."""
    missing = missing_env(value)
    if missing:
        names = ", ".join(missing)
        raise SpecError(f"{where} needs the environment variable{'s' if len(missing) > 1 else ''} {names}, "
                        f"which {'are' if len(missing) > 1 else 'is'} not set; set "
                        f"{'them' if len(missing) > 1 else 'it'} to the secret (the project file and the "
                        f"stored specs name secrets, never hold them): {redact_url(value)}", path=where)
    return REFERENCE.sub(lambda m: os.environ[m.group(1)], value)


def check_references(value: str | None) -> str | None:
    """A pydantic validator: every `${` in `value` starts a well-formed `${NAME}` reference."""
    if value is not None and value.count("${") != len(REFERENCE.findall(value)):
        raise ValueError("'${' starts a reference to an environment variable: write ${NAME}, NAME made of "
                         "letters, digits and '_'")
    return value


def _rewrite(url: str, replace: Callable[[str], str]) -> str:
    """`url` with the literal password and secret query values replaced by `replace(what)`, `what`
    being 'password' or the parameter's name."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The host part ends at the first / ? or # after the last @ before any ? or #: a password holding
    # an unencoded / is still hidden (a path holding an @ is hidden too, the safe side).
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    start = head.rfind("@") + 1
    cut = min((i for i in (rest.find(c, start) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        if not REFERENCE.fullmatch(password):
            netloc = f"{user}:{replace('password')}@{host}"
    tail, hash_, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    if query:
        query = "&".join(_param(part, replace) for part in query.split("&"))
    return f"{scheme}://{netloc}{path}{question}{query}{hash_}{fragment}"


def _param(part: str, replace: Callable[[str], str]) -> str:
    name, eq, value = part.partition("=")
    if eq and value and _SECRET_PARAM.search(name) and not REFERENCE.fullmatch(value):
        return f"{name}={replace(name)}"
    return part
