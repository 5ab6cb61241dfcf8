"""Who may change production from the dashboard: nobody without an admin token configured, nobody not
signed in with it, and a signed-in browser only with the form's CSRF token and from the dashboard's own
pages (never a cross-site request). Every refusal is 403 and changes nothing; a change does what the
CLI does and is recorded with the actor "dashboard"; the registry's refusals show on the page (404,
409, 422), never a 500."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from everloop import registry
from everloop.store import Store
from everloop.ui import create_ui
from tests.ui.conftest import TOKEN
from tests.ui.test_overview_loop import page

PAGES = ["/", "/loop", "/models", "/data", "/monitoring"]
CHANGES = ["/actions/promote", "/actions/rollback", "/actions/rollout/step", "/actions/rollout/promote",
           "/actions/rollout/rollback", "/actions/rollout/abort"]
FORM = {"version": "1", "reason": "try", "share": "50", "force": "1"}


def production(folder: Path) -> int | None:
    return registry.alias_version(Store.for_project(folder), "production")


def copy_of(store: Store, version: int) -> int:
    """A new model version holding `version`'s artifact: a candidate that passes the gate against it
    (no loss), without training. Returns its version."""
    t = store.tables.models
    with store.engine.begin() as conn:
        row = conn.execute(t.select().where(t.c.version == version)).first()
        return conn.execute(t.insert().values(dataset_version=row.dataset_version, artifact=row.artifact,
                                              manifest=row.manifest, metric=row.metric, value=row.value,
                                              reason=f"a copy of v{version}").returning(t.c.version)).scalar_one()


def last_move(folder: Path) -> dict:
    return registry.alias_history(Store.for_project(folder))[-1]


def assert_no_change_form(client: TestClient) -> None:
    for path in PAGES:
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.status_code)
        forms = [f["attrs"].get("action", "") for f in page(answer.text).forms]
        assert not [f for f in forms if "/actions/" in f], (path, forms)
        assert 'name="csrf"' not in answer.text, path


def test_without_an_admin_token_nothing_can_be_changed_and_no_form_is_shown(demo_copy: Path):
    before = production(demo_copy)
    with TestClient(create_ui(demo_copy, admin_token="")) as client:
        assert_no_change_form(client)
        assert "start the dashboard with" in page(client.get("/").text).text("actions")
        for path in CHANGES:
            answer = client.post(path, data=FORM | {"csrf": "guess"})
            assert answer.status_code == 403, path
            assert page(answer.text).text("error").startswith("changes are off: start the dashboard with an admin "
                                                              "token (EVERLOOP_ADMIN_TOKEN)")
        # a bearer header with some token does not help either: there is none to match
        refused = client.post("/actions/rollback", data={"csrf": ""}, headers={"Authorization": "Bearer x"})
        assert refused.status_code == 403
    assert production(demo_copy) == before
    assert registry.latest_rollout(Store.for_project(demo_copy)) is None


def test_with_a_token_but_not_signed_in_nothing_can_be_changed(demo_copy: Path):
    before = production(demo_copy)
    with TestClient(create_ui(demo_copy, admin_token=TOKEN)) as client:
        assert_no_change_form(client)
        assert page(client.get("/").text).text("actions") == (
            "Change production Sign in with the admin token to promote or roll back.")
        for path in CHANGES:
            answer = client.post(path, data=FORM | {"csrf": csrf_token(client)})  # even the right CSRF value
            assert answer.status_code == 403, path
            assert page(answer.text).text("error") == "the admin token is required: sign in on the login page"
        wrong = client.post("/login", data={"token": "not-it"}, follow_redirects=False)
        assert wrong.status_code == 403 and "that is not the admin token" in wrong.text
        assert client.post("/actions/rollback", data={"csrf": ""}).status_code == 403
    assert production(demo_copy) == before


def csrf_token(client: TestClient) -> str:
    """The CSRF value a signed-in page would carry (computed as _auth does, from the token)."""
    from everloop.ui._auth import _mac

    return _mac(TOKEN, "csrf")


def test_signed_in_the_forms_carry_a_csrf_token_and_every_forged_post_is_refused(admin_ui: TestClient,
                                                                                 demo_copy: Path):
    shown = page(admin_ui.get("/").text)
    forms = {f["attrs"]["action"]: f["inputs"] for f in shown.forms}
    assert forms["/actions/promote"]["csrf"] == forms["/actions/rollback"]["csrf"] == csrf_token(admin_ui)
    assert set(forms["/actions/promote"]) >= {"csrf", "version", "mode", "share", "force", "reason"}
    before, history = production(demo_copy), len(registry.alias_history(Store.for_project(demo_copy)))
    candidate = copy_of(Store.for_project(demo_copy), before)  # one the gate would let through
    good = {"version": str(candidate), "reason": "forged", "csrf": csrf_token(admin_ui)}
    forged = [
        ({k: v for k, v in good.items() if k != "csrf"}, {}, "the form's CSRF token is missing or wrong"),
        (good | {"csrf": "0" * 64}, {}, "the form's CSRF token is missing or wrong"),
        (good, {"Origin": "https://evil.example"}, "refused a cross-site request"),
        (good, {"Origin": "null"}, "refused a cross-site request"),
        (good, {"Sec-Fetch-Site": "cross-site"}, "refused a cross-site request"),
        (good, {"Sec-Fetch-Site": "same-site"}, "refused a cross-site request"),
    ]
    for form, headers, why in forged:
        answer = admin_ui.post("/actions/promote", data=form, headers=headers, follow_redirects=False)
        assert answer.status_code == 403, (form, headers)
        assert page(answer.text).text("error").startswith(why)
    for path in CHANGES[1:]:  # the rollback and rollout forms too
        answer = admin_ui.post(path, data={"share": "50"}, headers={"Sec-Fetch-Site": "cross-site"})
        assert answer.status_code == 403, path
    assert production(demo_copy) == before
    assert len(registry.alias_history(Store.for_project(demo_copy))) == history
    # the same form from the dashboard's own page goes through
    same_site = admin_ui.post("/actions/promote", data=good, follow_redirects=False,
                              headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
    assert same_site.status_code == 303 and production(demo_copy) == candidate


def test_a_signed_in_promote_moves_production_through_the_gate_as_the_dashboard(admin_ui: TestClient,
                                                                               demo_copy: Path):
    store = Store.for_project(demo_copy)
    before = production(demo_copy)
    candidate = copy_of(store, before)
    answer = admin_ui.post("/actions/promote", data={"version": str(candidate), "reason": "same model, re-registered",
                                                     "csrf": csrf_token(admin_ui)}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/?done=promoted"
    assert production(demo_copy) == candidate
    move = last_move(demo_copy)
    assert (move["from_version"], move["to_version"], move["actor"], move["reason"], move["forced"]) == (
        before, candidate, "dashboard", "same model, re-registered", False)
    shown = page(admin_ui.get(answer.headers["location"]).text)
    assert shown.text("message") == f"Promoted: production is model v{candidate}."
    assert shown.ids["production-version"]["data-version"] == str(candidate)
    # promoting it again changes nothing, and says so
    again = admin_ui.post("/actions/promote", data={"version": str(candidate), "csrf": csrf_token(admin_ui)})
    assert again.status_code == 200 and page(again.text).text("message") == (
        f"Model v{candidate} was already in production; nothing changed.")
    assert last_move(demo_copy)["id"] == move["id"]


def test_a_signed_in_rollback_goes_back_as_the_dashboard(admin_ui: TestClient, demo_copy: Path):
    history = registry.alias_history(Store.for_project(demo_copy))
    before, earlier = history[-1]["to_version"], history[-1]["from_version"]
    answer = admin_ui.post("/actions/rollback", follow_redirects=False,
                           data={"reason": "  worse \n than before ", "csrf": csrf_token(admin_ui)})
    assert answer.status_code == 303 and answer.headers["location"] == "/?done=rolled_back"
    assert production(demo_copy) == earlier != before
    move = last_move(demo_copy)
    assert (move["from_version"], move["to_version"], move["actor"], move["reason"]) == (
        before, earlier, "dashboard", "worse than before")
    assert page(admin_ui.get("/?done=rolled_back").text).text("message") == (
        f"Rolled back: production is model v{earlier}.")


def test_the_registrys_refusals_show_on_the_page_and_change_nothing(admin_ui: TestClient, demo_copy: Path):
    csrf = csrf_token(admin_ui)
    before = production(demo_copy)
    history = len(registry.alias_history(Store.for_project(demo_copy)))
    worse = 1 if before != 1 else 2  # the demo's first model: worse than the retrained one on the same rows
    refusals = [
        ("/actions/promote", {"version": str(worse)}, 409, f"model v{worse} was not promoted:"),
        ("/actions/promote", {"version": "99"}, 404, "model version 99 does not exist"),
        ("/actions/promote", {"version": "abc"}, 422, "version 'abc': expected a whole number of 1 or more"),
        ("/actions/promote", {}, 422, "version: missing"),
        ("/actions/promote", {"version": "1", "mode": "sideways"}, 422, "mode 'sideways': expected one of"),
        ("/actions/promote", {"version": "1", "share": "10"}, 422, "share 10: only a canary"),
        ("/actions/promote", {"version": "1", "mode": "canary", "share": "150"}, 422,
         "share '150': expected a percent"),
        ("/actions/rollout/step", {"share": "50"}, 404, "no rollout is active"),
        ("/actions/rollout/promote", {}, 404, "no rollout is active"),
        ("/actions/rollout/sideways", {}, 404, "/actions/rollout/sideways: no such change"),
    ]
    for path, form, status, why in refusals:
        answer = admin_ui.post(path, data=form | {"csrf": csrf})
        assert answer.status_code == status, (path, form, answer.status_code)
        assert page(answer.text).text("error").startswith(why), (path, form)
        assert page(answer.text).ids["production-version"]["data-version"] == str(before)
    assert production(demo_copy) == before
    assert len(registry.alias_history(Store.for_project(demo_copy))) == history
    assert registry.latest_rollout(Store.for_project(demo_copy)) is None
    # a forced promotion goes past the gate, and is recorded as forced
    forced = admin_ui.post("/actions/promote", data={"version": str(worse), "force": "1", "csrf": csrf},
                           follow_redirects=False)
    assert forced.status_code == 303 and production(demo_copy) == worse
    move = last_move(demo_copy)
    assert move["forced"] and move["actor"] == "dashboard" and "(forced past:" in move["reason"]


def test_a_rollout_is_started_stepped_and_aborted_from_the_dashboard(admin_ui: TestClient, demo_copy: Path):
    store = Store.for_project(demo_copy)
    before = production(demo_copy)
    candidate = copy_of(store, before)
    csrf = csrf_token(admin_ui)
    started = admin_ui.post("/actions/promote", data={"version": str(candidate), "mode": "canary", "share": "10",
                                                      "csrf": csrf}, follow_redirects=False)
    assert started.status_code == 303 and started.headers["location"] == "/?done=rollout_started"
    rollout = registry.active_rollout(store)
    assert (rollout.candidate, rollout.production, rollout.mode, rollout.share, rollout.actor) == (
        candidate, before, "canary", 10.0, "dashboard")
    shown = page(admin_ui.get("/").text)
    forms = {f["attrs"]["action"]: f["inputs"] for f in shown.forms}
    assert forms["/actions/rollout/step"]["rollout"] == str(rollout.id)
    stepped = admin_ui.post("/actions/rollout/step", data={"share": "50", "rollout": str(rollout.id),
                                                           "reason": "looks fine", "csrf": csrf})
    assert stepped.status_code == 200 and page(stepped.text).text("message") == (
        f"Rollout {rollout.id}: the canary now answers 50% of the traffic.")
    now = registry.get_rollout(store, rollout.id)
    assert (now.share, now.actor, now.reason) == (50.0, "dashboard", "looks fine")
    stale = admin_ui.post("/actions/rollout/abort", data={"rollout": str(rollout.id + 1), "csrf": csrf})
    assert stale.status_code == 409 and "is no longer active" in page(stale.text).text("error")
    aborted = admin_ui.post("/actions/rollout/abort", data={"rollout": str(rollout.id), "csrf": csrf},
                            follow_redirects=False)
    assert aborted.status_code == 303
    ended = registry.get_rollout(store, rollout.id)
    assert (ended.status, ended.actor, ended.reason) == ("aborted", "dashboard", "dashboard: rollout abort")
    assert production(demo_copy) == before


def test_a_shadow_promoted_from_the_dashboard_moves_production(admin_ui: TestClient, demo_copy: Path):
    store = Store.for_project(demo_copy)
    before = production(demo_copy)
    candidate = copy_of(store, before)
    csrf = csrf_token(admin_ui)
    assert admin_ui.post("/actions/promote", data={"version": str(candidate), "mode": "shadow", "csrf": csrf},
                         follow_redirects=False).status_code == 303
    rollout = registry.active_rollout(store)
    assert rollout.mode == "shadow" and rollout.actor == "dashboard"
    step = admin_ui.post("/actions/rollout/step", data={"share": "50", "csrf": csrf})
    assert step.status_code == 422 and "is a shadow" in page(step.text).text("error")
    promoted = admin_ui.post("/actions/rollout/promote", data={"reason": "judged by eye", "csrf": csrf})
    assert promoted.status_code == 200
    assert page(promoted.text).text("message") == f"Rollout {rollout.id} promoted: production is model v{candidate}."
    assert production(demo_copy) == candidate
    move = last_move(demo_copy)
    assert move["actor"] == "dashboard" and move["reason"] == f"shadow rollout {rollout.id}: judged by eye"


def test_oversized_and_non_form_bodies_are_refused(admin_ui: TestClient, demo_copy: Path):
    before = production(demo_copy)
    big = admin_ui.post("/actions/rollback", data={"csrf": csrf_token(admin_ui), "reason": "x" * 20_000})
    assert big.status_code == 413 and "the limit is 16384" in page(big.text).text("error")
    as_json = admin_ui.post("/actions/rollback", json={"csrf": csrf_token(admin_ui)})
    assert as_json.status_code == 415
    assert production(demo_copy) == before


def test_the_session_cookie_is_http_only_and_same_site_strict(demo_copy: Path):
    with TestClient(create_ui(demo_copy, admin_token=TOKEN)) as client:
        answer = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN not in cookie


def test_the_login_form_is_read_bounded_like_the_action_forms(demo_copy: Path):
    with TestClient(create_ui(demo_copy, admin_token=TOKEN)) as client:
        big = client.post("/login", data={"token": "x" * 20_000}, follow_redirects=False)
        assert big.status_code == 413 and "the limit is 16384" in big.text and "everloop_ui" not in big.headers.get(
            "set-cookie", "")
        assert client.post("/login", json={"token": TOKEN}, follow_redirects=False).status_code == 415
        wrong = client.post("/login", data={"token": TOKEN + "x"}, follow_redirects=False)
        assert wrong.status_code == 403 and "that is not the admin token" in wrong.text
        assert client.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303


def test_a_script_with_the_bearer_token_needs_no_csrf_field_but_a_wrong_token_changes_nothing(demo_copy: Path):
    before = production(demo_copy)
    with TestClient(create_ui(demo_copy, admin_token=TOKEN)) as client:
        wrong = client.post("/actions/rollback", data={"reason": "x"}, headers={"Authorization": f"Bearer {TOKEN}x"},
                            follow_redirects=False)
        assert wrong.status_code == 403 and production(demo_copy) == before
        forged = client.post("/actions/rollback", data={"reason": "x"}, follow_redirects=False,
                             headers={"Authorization": f"Bearer {TOKEN}", "Sec-Fetch-Site": "cross-site"})
        assert forged.status_code == 403 and production(demo_copy) == before
        done = client.post("/actions/rollback", data={"reason": "by a script"},
                           headers={"Authorization": f"Bearer {TOKEN}"}, follow_redirects=False)
        assert done.status_code == 303
    assert production(demo_copy) != before
