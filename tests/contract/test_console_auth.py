"""The console's pages sit behind the same tokens as the APIs, carried in a session cookie.

Its HTML routes are out of the OpenAPI, so test_authentication.py cannot see them: every page
sends an anonymous browser to the sign-in page (and answers htmx with 401), every action needs
the session's CSRF token from the console's own origin, and signing in sets a cookie scripts
cannot read, sent only over TLS (or to 127.0.0.1) and never cross-site, that dies with its
token. The app is built as the service builds it, without its lifespan and with the APIs it
calls closed: every refusal here comes before any call to them.
"""

from __future__ import annotations

import html
import re
from http.cookies import SimpleCookie
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from slmops.auth import LocalCredentials, TokenIssuer, scopes_of_role
from slmops.auth.local import ensure_local_credentials
from slmops.auth.tokens import generate_signing_key
from slmops.settings import PlatformSettings
from slmops.testing.ports import free_port
from slmops_console.app import create_app
from slmops_console.settings import ConsoleSettings

ORIGIN = "https://console.example"  # where operators open it (TLS in front)
EVIL = "https://evil.example"
COOKIE = "slmops_session"
SIGN_IN = "/login"
PUBLIC = {"/healthz", "/readyz", SIGN_IN}
HOME = "/"  # a fixed redirect to the models page: it shows nothing itself
PARAMS = {"action": "pause"}  # a real action: a refusal is not a 404; other params: "x1"


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> LocalCredentials:
    """As the `credentials` fixture (what `slmops up` mints), once for the module: the app
    holds no state between requests but its CSRF key, and keys take a while to make."""
    return ensure_local_credentials(tmp_path_factory.mktemp("console") / "var")


@pytest.fixture(scope="module")
def app(credentials: LocalCredentials) -> FastAPI:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: the APIs are never reached
    urls = {f"{api}_url": closed for api in ("registry", "optimizer", "validator", "rollout")}
    platform = PlatformSettings(var_dir=credentials.root.parent)
    return create_app(ConsoleSettings(platform=platform, **urls))


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    # No `with`: no lifespan, no NATS. Cookies are sent by hand, never kept between requests.
    return TestClient(app, base_url=ORIGIN, follow_redirects=False)


def token(credentials: LocalCredentials, role: str, ttl_s: float = 600) -> str:
    return credentials.issuer().mint(f"user:{role}", scopes_of_role(role), ttl_s=ttl_s)


def forged() -> str:
    """An admin's token signed by a key the console never trusted."""
    return TokenIssuer(generate_signing_key()).mint("user:admin", scopes_of_role("admin"), ttl_s=60)


def concrete(path_format: str) -> str:
    for name in re.findall(r"\{(\w+)\}", path_format):
        path_format = path_format.replace("{" + name + "}", PARAMS.get(name, "x1"))
    return path_format


def routes(app: FastAPI, method: str, *, pages_only: bool = False) -> list[str]:
    """Concrete paths of the app's ``method`` routes; ``pages_only``: the console's own HTML
    routes (FastAPI routes out of the OpenAPI: not FastAPI's docs, not /static), not public."""
    found = []
    for route in iter_route_contexts(app.routes):
        if method not in (route.methods or set()) or not route.path_format:
            continue
        original = route.original_route
        if pages_only and not (isinstance(original, APIRoute) and not original.include_in_schema):
            continue
        found.append(concrete(route.path_format))
    return [p for p in found if not pages_only or p not in PUBLIC | {HOME}]


def pages(app: FastAPI) -> list[str]:
    return routes(app, "GET", pages_only=True)


def signed_in(session_token: str, **headers: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={session_token}", **headers}


def csrf_of(client: TestClient, session_token: str) -> str:
    """The CSRF token a signed-in page hands the browser (the traces page needs no API)."""
    page = client.get("/traces", headers=signed_in(session_token))
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert found, page.text
    return found[1]


def set_cookie(response: httpx.Response) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        jar.load(header)
    return jar


def test_every_page_sends_anonymous_browsers_to_sign_in(app: FastAPI, client: TestClient) -> None:
    found = pages(app)
    # Every GET route is accounted for: a page tested here, an OpenAPI operation, public,
    # or FastAPI's own docs.
    api = {path for path in app.openapi()["paths"]}
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    assert set(routes(app, "GET")) - set(found) - api - PUBLIC - docs == {HOME}
    assert {"/models", "/rollouts", "/fleet", "/traces", "/rollouts/x1/live"} <= set(found)
    wrong: list[str] = []
    for path in found:
        browser = client.get(path)
        location = urlsplit(browser.headers.get("location", ""))
        if browser.status_code != 303 or location.path != SIGN_IN or location.netloc:
            wrong.append(f"browser GET {path} -> {browser.status_code} {location.geturl()}")
        htmx = client.get(path, headers={"HX-Request": "true"})
        if (htmx.status_code, htmx.headers.get("hx-redirect")) != (401, SIGN_IN):
            wrong.append(f"htmx GET {path} -> {htmx.status_code}")
        stream = client.get(path, headers={"Accept": "text/event-stream"})
        if stream.status_code != 401:
            wrong.append(f"event stream GET {path} -> {stream.status_code}")
    home = client.get(HOME)
    assert wrong == []
    assert (home.status_code, home.headers["location"]) == (303, "/models")


def test_a_forged_expired_or_unreadable_session_signs_out(
    app: FastAPI, client: TestClient, credentials: LocalCredentials
) -> None:
    stranger = forged()
    expired = token(credentials, "admin", ttl_s=-120)
    scraper = credentials.token("metrics")  # valid, but may not read the platform
    for bad in (stranger, expired, scraper, "not-a-token"):
        for path in pages(app):
            answer = client.get(path, headers=signed_in(bad))
            assert answer.status_code == 303, (path, answer.status_code)
            assert urlsplit(answer.headers["location"]).path == SIGN_IN


def test_every_action_needs_the_csrf_token_from_the_consoles_own_origin(
    app: FastAPI, client: TestClient, credentials: LocalCredentials
) -> None:
    operator = token(credentials, "operator")
    csrf = csrf_of(client, operator)
    actions = [path for path in routes(app, "POST") if path != SIGN_IN]
    assert {"/logout", "/rollouts/x1/pause"} <= set(actions)
    refused = {"anonymous": [], "no token": [], "wrong token": [], "cross-site": []}
    for path in actions:
        attempts = {
            "anonymous": {"X-CSRF-Token": csrf},
            "no token": signed_in(operator),
            "wrong token": signed_in(operator, **{"X-CSRF-Token": "0" * len(csrf)}),
            "cross-site": signed_in(operator, Origin=EVIL, **{"X-CSRF-Token": csrf}),
        }
        for kind, headers in attempts.items():
            answer = client.post(path, headers=headers, data={})
            expected = 303 if kind == "anonymous" else 403  # anonymous: to sign in
            if answer.status_code != expected:
                refused[kind].append(f"POST {path} -> {answer.status_code}")
        # The form field works as the header does, and from the console's origin it passes:
        # the rollout API (closed) is what fails next, not the check.
        same_site = signed_in(operator, Origin=ORIGIN)
        past = client.post(path, headers=same_site, data={"csrf_token": csrf})
        assert past.status_code not in (401, 403), (path, past.text)
    assert refused == {"anonymous": [], "no token": [], "wrong token": [], "cross-site": []}


def test_a_viewer_may_look_but_not_act(client: TestClient, credentials: LocalCredentials) -> None:
    viewer = token(credentials, "viewer")
    csrf = csrf_of(client, viewer)

    answer = client.post("/rollouts/x1/pause", headers=signed_in(viewer, **{"X-CSRF-Token": csrf}))

    assert answer.status_code == 403
    assert "operator" in answer.text


def test_a_bad_token_signs_no_one_in(client: TestClient, credentials: LocalCredentials) -> None:
    expired = token(credentials, "admin", ttl_s=-120)
    for bad in ("", "not-a-token", forged(), expired, credentials.token("metrics")):
        answer = client.post(SIGN_IN, data={"token": bad, "next": "/rollouts"})
        assert answer.status_code == 401, answer.text
        assert "set-cookie" not in answer.headers


def test_another_site_cannot_sign_a_browser_in(
    client: TestClient, credentials: LocalCredentials
) -> None:
    # a page elsewhere posting its own (valid) token would sign the visitor in as the attacker
    answer = client.post(SIGN_IN, data={"token": credentials.token("admin")},
                         headers={"Origin": "https://evil.example"})  # fmt: skip
    assert answer.status_code == 403
    assert "set-cookie" not in answer.headers


def test_a_good_token_sets_a_strict_http_only_secure_cookie_that_dies_with_it(
    client: TestClient, credentials: LocalCredentials
) -> None:
    ttl_s = 600
    operator = token(credentials, "operator", ttl_s=ttl_s)

    answer = client.post(SIGN_IN, data={"token": operator, "next": "/rollouts"})
    cookie = set_cookie(answer)[COOKIE]

    assert (answer.status_code, answer.headers["location"]) == (303, "/rollouts")
    assert cookie.value == operator
    assert cookie["httponly"] is True
    assert cookie["secure"] is True
    assert cookie["samesite"].lower() == "strict"
    assert 0 < int(cookie["max-age"]) <= ttl_s
    assert cookie["path"] == "/"


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example",
        "https://evil.example/x",
        "/\\evil.example",
        "/\t/evil.example",
        "//evil.example/%2F..",
    ],
)
def test_signing_in_never_redirects_off_site(
    client: TestClient, credentials: LocalCredentials, target: str
) -> None:
    form = client.get(SIGN_IN, params={"next": target})
    carried = re.search(r'name="next" value="([^"]*)"', form.text)
    assert form.status_code == 200
    assert carried
    # What the sign-in form posts back, and what a forged form would post.
    for posted in (html.unescape(carried[1]), target):
        signed = {"token": token(credentials, "viewer"), "next": posted}
        answer = client.post(SIGN_IN, data=signed)
        # As a browser resolves it (a backslash is a slash, tabs and newlines are dropped).
        location = re.sub(r"[\t\n\r]", "", answer.headers["location"].replace("\\", "/"))
        landed = urlsplit(urljoin(ORIGIN + "/", location))
        assert answer.status_code == 303
        assert f"{landed.scheme}://{landed.netloc}" == ORIGIN, answer.headers["location"]


def test_signing_in_keeps_the_page_it_came_from(
    client: TestClient, credentials: LocalCredentials
) -> None:
    anonymous = client.get("/fleet", params={"page": "2"})
    back = httpx.URL(anonymous.headers["location"]).params["next"]
    signed = client.post(SIGN_IN, data={"token": token(credentials, "viewer"), "next": back})

    assert signed.headers["location"] == "/fleet?page=2"


def test_signing_out_forgets_the_cookie(client: TestClient, credentials: LocalCredentials) -> None:
    viewer = token(credentials, "viewer")
    csrf = csrf_of(client, viewer)

    headers = signed_in(viewer, Origin=ORIGIN)
    answer = client.post("/logout", headers=headers, data={"csrf_token": csrf})
    cookie = set_cookie(answer)[COOKIE]

    assert answer.status_code == 303
    assert urlsplit(answer.headers["location"]).path == SIGN_IN
    assert cookie.value in ("", '""')
    assert int(cookie["max-age"]) <= 0
