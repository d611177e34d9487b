"""The viewer's sign-in (`ViewerAuth` in streamer/api/signin.py) on a made-up clock: one-time
codes expire, work once and are bounded in number, as are the sessions they open. The viewer in
a real browser: tests/test_viewer.py."""

from __future__ import annotations


def test_sign_in_codes_expire_work_once_and_are_bounded() -> None:
    from streamer.api.signin import ViewerAuth

    now = [1000.0]
    auth = ViewerAuth(
        code_ttl=60, session_ttl=3600, max_codes=3, max_sessions=2, clock=lambda: now[0]
    )
    code = auth.mint()
    sid = auth.redeem(code)
    assert sid and auth.session_ok(sid)
    assert auth.redeem(code) is None  # once only
    late = auth.mint()
    now[0] += 61
    assert auth.redeem(late) is None  # expired
    codes = [auth.mint() for _ in range(4)]  # beyond max_codes the oldest goes
    assert auth.redeem(codes[0]) is None and auth.redeem(codes[3])
    assert not auth.session_ok("forged") and not auth.session_ok(None)
    now[0] += 3600
    assert not auth.session_ok(sid)  # the session expired
