"""Password guessing against the real `pacsgrid serve` (auth on, 127.0.0.1), bounded in count.

- a wrong password costs one scrypt whether or not the user exists (the answer must not tell
  which user names exist), counted by the server's own pacsgrid_password_hashes_total;
- 64 clients guessing at once: the number of password checks stays bounded (their own threads,
  a bounded queue, then back-off: 429 with Retry-After), the start of the back-off is audited,
  and a request with an API token is answered meanwhile;
- the back-off is per address and grows: after it ends, the next wrong password starts a wait
  twice as long.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.conftest import Server
from tests.web_helpers import audit_records, start_web, users

PASSWORD_CHECKS = 2  # http.password_checks: at most 5 times as many run or wait


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _start(tmp_path: Path, **env: str) -> tuple[Server, str, str]:
    """A server with user `reader` (password 'right') and an API token of user `bot`."""
    data = tmp_path / "archive"
    data.mkdir()
    users(data, "add", "reader", "--role", "read", "--password-stdin", stdin="right\n")
    users(data, "add", "bot", "--role", "read", "--no-password")
    token = users(data, "token", "bot")
    server, base = start_web(
        data,
        extra=("--auth", "on"),
        env={"PACSGRID_HTTP_PASSWORD_CHECKS": str(PASSWORD_CHECKS), **env},
    )
    return server, base, token


def _hashes(base: str, token: str) -> float:
    text = requests.get(
        base + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).text
    lines = [x for x in text.splitlines() if x.startswith("pacsgrid_password_hashes_total ")]
    return float(lines[0].split()[1]) if lines else 0.0


@pytest.mark.slow
def test_unknown_and_known_users_cost_one_scrypt(tmp_path: Path) -> None:
    server, base, token = _start(tmp_path)
    try:
        url = base + "/dicom-web/studies"
        cases = [("reader", "wrong"), ("nobody", "wrong"), ("bot", "wrong"), ("reader", "right")]
        for user, password in cases:
            before = _hashes(base, token)
            r = requests.get(url, headers=_basic(user, password), timeout=30)
            assert r.status_code == (200 if password == "right" else 401), (user, r.text)
            assert _hashes(base, token) - before == 1, f"{user}/{password}: not one scrypt"
    finally:
        server.stop()


@pytest.mark.slow
def test_guessers_back_off_while_a_token_is_answered(tmp_path: Path) -> None:
    server, base, token = _start(
        tmp_path, PACSGRID_HTTP_LOGIN_FAILURES="3", PACSGRID_HTTP_LOGIN_BACKOFF="600"
    )
    try:
        url = base + "/dicom-web/studies"
        before = _hashes(base, token)
        statuses: Counter[int] = Counter()
        retry_after: list[int] = []
        lock = threading.Lock()
        go = threading.Barrier(65)

        def guess(i: int) -> None:
            with requests.Session() as s:
                go.wait(timeout=60)
                for n in range(5):
                    r = s.get(url, headers=_basic("reader", f"guess-{i}-{n}"), timeout=120)
                    with lock:
                        statuses[r.status_code] += 1
                        if r.status_code == 429:
                            retry_after.append(int(r.headers["Retry-After"]))

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        go.wait(timeout=60)
        answered = []
        while any(t.is_alive() for t in threads) or not answered:  # during the guessing
            r = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
            answered.append(r.status_code)
        for t in threads:
            t.join(timeout=300)
        checks = _hashes(base, token) - before
    finally:
        server.stop()
    assert set(answered) == {200}, answered
    assert sum(statuses.values()) == 320
    assert set(statuses) <= {401, 429}, statuses
    # At most 5 * password_checks requests run or wait at once; until the third wrong password
    # starts the back-off, two finished checks make room for two more. Every other guess was
    # refused without a check.
    bound = 5 * PASSWORD_CHECKS + 2
    assert checks <= bound, f"{checks} password checks for {statuses}"
    assert statuses[401] == checks
    assert statuses[429] >= 320 - bound
    assert retry_after and all(0 < s <= 600 for s in retry_after)
    waits = [
        a
        for a in audit_records(server.data_dir / "audit.jsonl")
        if a["operation"] == "login" and "no password checked" in a["detail"]
    ]
    assert len(waits) == 1 and waits[0]["address"] == "127.0.0.1", waits


# The first wait of the back-off test: the requests that must land within a wait (the right
# password, the wrong one after the first wait) follow the one that started it at once, but
# on a loaded machine "at once" can take seconds.
BACKOFF = 20


@pytest.mark.slow
def test_backoff_grows_and_spares_tokens(tmp_path: Path) -> None:
    server, base, token = _start(
        tmp_path, PACSGRID_HTTP_LOGIN_FAILURES="2", PACSGRID_HTTP_LOGIN_BACKOFF=str(BACKOFF)
    )
    try:
        url = base + "/dicom-web/studies"
        wrong = _basic("reader", "wrong")
        assert [requests.get(url, headers=wrong, timeout=30).status_code for _ in "ab"] == [
            401,
            401,
        ]
        first = requests.get(url, headers=_basic("reader", "right"), timeout=30)
        assert first.status_code == 429, "the right password waits too: it is not checked"
        assert 1 <= int(first.headers["Retry-After"]) <= BACKOFF
        ok = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert ok.status_code == 200, "API tokens are not held up by the wait"
        deadline = time.monotonic() + BACKOFF + 120
        while (r := requests.get(url, headers=wrong, timeout=30)).status_code == 429:
            assert time.monotonic() < deadline, "the first wait never ended"
            time.sleep(0.2)
        assert r.status_code == 401  # checked again once the wait was over
        again = requests.get(url, headers=wrong, timeout=30)
        assert again.status_code == 429 and 1 <= int(again.headers["Retry-After"]) <= 2 * BACKOFF
    finally:
        server.stop()
    records = audit_records(server.data_dir / "audit.jsonl")
    waits = [a["detail"] for a in records if "no password checked" in a["detail"]]
    assert waits == [  # the second wait is twice as long as the first
        f"wrong passwords from 127.0.0.1: no password checked for {BACKOFF}s",
        f"wrong passwords from 127.0.0.1: no password checked for {2 * BACKOFF}s",
    ]
