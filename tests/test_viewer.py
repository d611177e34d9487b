"""The browser viewer in a real headless Chromium (Debian's, driven by Selenium through Debian's
chromedriver) against a real agent on the lab, with real traffic.

- Sign-in: the one-time link the agent prints works once and sets an HttpOnly, SameSite=Strict
  cookie; the cookie reads but never writes; no code, token or cookie reaches the agent's log.
- Denied and logged flows appear as rows with the right fields within a second.
- Each filter (verdict, address/CIDR, port, protocol, rule) narrows the rows; pause holds them.
- What is on screen, at 1024 to 1920 px wide: every column is displayed with a readable width
  inside the window, headers unclipped, a denied row's rule cell reads "1002 no-ssh" in full;
  the side panel is beside the table, or below it when the window is narrow; no sideways scroll.
- A forced gap (a one-page ring buffer overflowed by a burst) shows in the lost counter, equal to
  what the agent counted.
- The fleet view (the agent given the fleet's flows topic, contract §7): the "fleet" toggle
  shows; on, records of two hosts written to the topic appear with their host column and the
  hosts are nodes of the map; off, the page is back to the agent's own feed, without the column.
- At 1,000 events/s the page keeps answering, keeps the table capped and counts every event;
  the full table scrolls in its own box, its column headers and the side panel staying in view.

A screenshot goes to tests/artifacts/viewer.png (and to docs/viewer.png, the README's, when
MICROSEG_DOCS_SCREENSHOT=1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select
from support import REPO
from support.agentapi import api_of, api_stats, request
from support.agentproc import AgentFactory, AgentProcess, flows, free_port, write_policy
from support.netutil import host, syn, udp_to, wait_until

from bench.kafkabroker import KafkaBroker, kcat_produce, unique_topic
from streamer.lab.lab import Lab

ARTIFACTS = REPO / "tests" / "artifacts"
RULES = [
    {
        "rule_id": 1002,
        "name": "no-ssh",
        "dst_port": 22,
        "protocol": "tcp",
        "action": "deny",
        "priority": 200,
    },
    {"rule_id": 1005, "name": "audit-pg", "dst_port": 5432, "protocol": "tcp", "action": "log"},
    {"rule_id": 1006, "name": "dns", "dst_port": 53, "protocol": "udp", "action": "allow"},
]
TABLE_CAP = 200  # streamer/viewer/app.js
FLEET_TOPIC = unique_topic("viewerfleet")


# ---- the agent and the browser --------------------------------------------------------------


def start_agent(agent: AgentProcess) -> AgentProcess:
    agent.start()
    agent.wait_api()
    return agent


@pytest.fixture(scope="module")
def agent(
    module_lab: Lab, tmp_path_factory: pytest.TempPathFactory, kafka_broker: KafkaBroker
) -> Iterator[AgentProcess]:
    """One agent for the module's tests (AgentProcess cleans up after itself on exit), given
    a fleet flows topic of its own (the fleet view's test writes to it)."""
    tmp = tmp_path_factory.mktemp("viewer")
    policy = write_policy(tmp / "policy.json", RULES, "deny")
    fleet = ["--fleet-flows", kafka_broker.bootstrap, "--fleet-flows-topic", FLEET_TOPIC]
    with AgentProcess(
        module_lab,
        policy,
        tmp / "events.jsonl",
        api=f"127.0.0.1:{free_port()}",
        extra_args=fleet,
    ) as a:
        yield start_agent(a)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, removed afterwards."""
    profile = tempfile.mkdtemp(prefix="microseg-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
    ):
        opts.add_argument(arg)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def startup_link(agent: AgentProcess) -> str:
    """The one-time sign-in link the agent printed on stdout at start."""
    assert wait_until(lambda: any(ln.startswith("viewer: ") for ln in agent.stdout_lines), 10)
    line = next(ln for ln in agent.stdout_lines if ln.startswith("viewer: "))
    return line.split(" ", 1)[1].strip()


def mint_link(agent: AgentProcess) -> str:
    r = api_of(agent).call("POST", "/viewer/codes")
    assert r.status == 201
    return agent.api_url + r.body["path"]


def sign_in(driver: WebDriver, link: str) -> None:
    driver.get(link)
    assert wait_until(lambda: driver.current_url.rstrip("/") == link.split("/login")[0], 5), (
        driver.current_url
    )
    assert wait_until(lambda: conn_state(driver) == "live", 10), conn_state(driver)


def conn_state(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "conn").get_attribute("data-state"))


ROWS_JS = """
return Array.from(document.querySelectorAll('#rows tr')).map(tr => ({
  seq: Number(tr.dataset.seq), lost: tr.classList.contains('lost'),
  cells: Object.fromEntries(Array.from(tr.cells).map(td => [td.className.slice(2), td.textContent]))
}));
"""


def rows(driver: WebDriver) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = driver.execute_script(ROWS_JS)
    return out


def flow_rows(driver: WebDriver) -> list[dict[str, str]]:
    return [r["cells"] for r in rows(driver) if not r["lost"]]


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


# ---- tests ------------------------------------------------------------------------------------


def test_sign_in_link_works_once_and_nothing_secret_is_logged(
    agent: AgentProcess, browser: WebDriver
) -> None:
    link = startup_link(agent)
    assert re.fullmatch(rf"{re.escape(agent.api_url)}/login\?code=[A-Za-z0-9_-]{{20,}}", link)
    status, page = request(f"{agent.api_url}/")
    assert status == 401 and "sign-in link" in page  # not signed in: told how to be

    sign_in(browser, link)
    cookies = [c for c in browser.get_cookies() if c["name"].startswith("microseg_session")]
    assert len(cookies) == 1, browser.get_cookies()
    cookie = cookies[0]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    # HttpOnly: the page's scripts cannot read it.
    assert "microseg_session" not in str(browser.execute_script("return document.cookie"))

    # The link worked once.
    status, page = request(link)
    assert status == 401 and "not valid" in page
    # The cookie reads (what the page needs) and never writes.
    jar = {"Cookie": f"{cookie['name']}={cookie['value']}"}
    assert request(f"{agent.api_url}/api/v1/stats", headers=jar)[0] == 200
    assert request(f"{agent.api_url}/api/v1/viewer/codes", "POST", jar)[0] == 401
    assert request(f"{agent.api_url}/api/v1/policies/1002", "DELETE", jar)[0] == 401
    assert (
        request(f"{agent.api_url}/api/v1/stats", headers={"Cookie": f"{cookie['name']}=forged"})[0]
        == 401
    )

    # A minted link, and nothing secret in the agent's log (there is no access log).
    minted = mint_link(agent)
    assert request(minted)[0] == 200
    token = agent.token()
    assert token
    for secret in (token, cookie["value"], link.split("code=")[1], minted.split("code=")[1]):
        assert secret not in agent.log
    assert minted.split("code=")[1] not in "\n".join(agent.stdout_lines)


def test_denied_and_logged_flows_appear_as_rows_within_a_second(
    agent: AgentProcess, browser: WebDriver, module_lab: Lab
) -> None:
    lab = module_lab
    # Record, in the page, when each source port first shows up in the table.
    browser.execute_script("""
      window.__seen = {};
      const body = document.getElementById('rows');
      new MutationObserver(() => {
        for (const td of body.querySelectorAll('td.c-sport')) {
          if (!(td.textContent in window.__seen)) window.__seen[td.textContent] = Date.now();
        }
      }).observe(body, {childList: true});
    """)
    sent: dict[int, tuple[float, str, str]] = {}
    for fam in ("v4", "v6"):
        for port, verdict in ((22, "deny"), (5432, "log")):
            t = time.time()
            sent[syn(lab, fam, port)] = (t, fam, verdict)

    def seen() -> dict[str, float]:
        out: dict[str, float] = browser.execute_script("return window.__seen")
        return out

    assert wait_until(lambda: all(str(p) in seen() for p in sent), 10), (seen(), sent)
    by_sport = {r["sport"]: r for r in flow_rows(browser)}
    for sport, (t_sent, fam, verdict) in sent.items():
        delay = seen()[str(sport)] / 1000 - t_sent
        assert delay <= 1.0, f"row for {fam} {verdict} appeared after {delay:.2f} s"
        r = by_sport[str(sport)]
        dport = "22" if verdict == "deny" else "5432"
        rule = "1002 no-ssh" if verdict == "deny" else "1005 audit-pg"
        peer = lab.peer_v4 if fam == "v4" else lab.peer_v6
        assert (r["verdict"], r["dir"], r["src"], r["dst"], r["dport"], r["proto"], r["rule"]) == (
            verdict,
            "ingress",
            peer,
            host(lab, fam),
            dport,
            "tcp",
            rule,
        ), r
        assert int(r["pkts"]) >= 1 and int(r["bytes"]) >= 40, r
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", r["time"]), r


def test_each_filter_narrows_the_rows_and_pause_holds_them(
    agent: AgentProcess, browser: WebDriver, module_lab: Lab
) -> None:
    lab = module_lab
    before = len(flows(agent))
    for fam in ("v4", "v6"):
        syn(lab, fam, 22)
        syn(lab, fam, 5432)
        udp_to(lab, fam, range(7001, 7004))  # default deny: no rule
    assert wait_until(lambda: len(flows(agent)) >= before + 10, 10)
    assert wait_until(lambda: {"udp", "tcp"} <= {r["proto"] for r in flow_rows(browser)}, 5)
    everything = flow_rows(browser)

    def narrowed(apply: Callable[[], None], keep: Callable[[dict[str, str]], bool]) -> None:
        apply()
        time.sleep(0.6)  # the page redraws four times a second
        shown = flow_rows(browser)
        assert shown, "the filter left nothing"
        assert all(keep(r) for r in shown), shown
        assert len(shown) < len(everything)
        browser.find_element(By.ID, "f-clear").click()
        assert wait_until(lambda: len(flow_rows(browser)) >= len(everything), 3)

    def typed(element_id: str, value: str) -> Callable[[], None]:
        return lambda: browser.find_element(By.ID, element_id).send_keys(value)

    def chosen(element_id: str, value: str) -> Callable[[], None]:
        return lambda: Select(browser.find_element(By.ID, element_id)).select_by_value(value)

    v4_net = "198.18.0.0/15"  # every lab's IPv4 addresses (streamer/lab/lab.py)
    narrowed(chosen("f-verdict", "log"), lambda r: r["verdict"] == "log")
    narrowed(chosen("f-protocol", "udp"), lambda r: r["proto"] == "udp")
    narrowed(typed("f-ip", v4_net), lambda r: ":" not in r["src"] and ":" not in r["dst"])
    narrowed(typed("f-ip", lab.peer_v6), lambda r: lab.peer_v6 in (r["src"], r["dst"]))
    narrowed(typed("f-port", "22"), lambda r: "22" in (r["sport"], r["dport"]))
    narrowed(typed("f-rule", "audit"), lambda r: r["rule"] == "1005 audit-pg")
    narrowed(typed("f-rule", "1002"), lambda r: r["rule"] == "1002 no-ssh")
    narrowed(typed("f-rule", "default"), lambda r: r["rule"] == "default")
    # A bad filter says so and is not applied.
    typed("f-ip", "10.0.0.300")()
    time.sleep(0.4)
    assert "address" in text(browser, "f-error")
    browser.find_element(By.ID, "f-clear").click()

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "viewer.png"))
    if os.environ.get("MICROSEG_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(ARTIFACTS / "viewer.png", REPO / "docs" / "viewer.png")

    # Pause: the rows stay as they are while events keep arriving (and are counted).
    browser.find_element(By.ID, "pause").click()
    time.sleep(0.4)
    held = [r["seq"] for r in rows(browser)]
    total = int(text(browser, "total"))
    before = len(flows(agent))
    sport = syn(lab, "v4", 22)
    assert wait_until(lambda: len(flows(agent)) > before, 5)
    assert wait_until(lambda: int(text(browser, "total")) > total, 3)
    time.sleep(0.6)
    assert [r["seq"] for r in rows(browser)] == held
    assert "held back" in text(browser, "paused-note")
    browser.find_element(By.ID, "pause").click()
    assert wait_until(lambda: str(sport) in {r["sport"] for r in flow_rows(browser)}, 2)


HEADERS = [
    "time (UTC)",
    "verdict",
    "direction",
    "source",
    "src port",
    "destination",
    "dst port",
    "protocol",
    "rule",
    "packets",
    "bytes",
]  # streamer/viewer/index.html
WIDTHS = (1024, 1280, 1400, 1920)
SIDE_BY_SIDE = 1360  # from this width the side panel is beside the table (style.css)
MIN_CELL_PX = 40  # any column: more than a couple of characters
READABLE_PX = 100  # source, destination, rule: about 13 characters of the cells' monospace

GEOMETRY_JS = """
const box = (el) => { const r = el.getBoundingClientRect();
  return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width,
          height: r.height, scrollWidth: el.scrollWidth, clientWidth: el.clientWidth}; };
const tr = [...document.querySelectorAll('#rows tr')].find(
  (t) => t.querySelector('td.c-sport')?.textContent === arguments[0]);
const doc = document.documentElement;
return {viewport: doc.clientWidth,  // without a vertical scrollbar
        pageScrollWidth: doc.scrollWidth,
        section: box(document.querySelector('section.table')),
        aside: box(document.querySelector('aside')), map: box(document.getElementById('map')),
        heads: [...document.querySelectorAll('#flows thead th')].map(box),
        cells: tr ? Object.fromEntries([...tr.cells].map((td) => [td.className.slice(2), box(td)]))
                  : null};
"""


def window_width(driver: WebDriver) -> int:
    """The layout viewport's width, scrollbar included (the media queries' width)."""
    return int(driver.execute_script("return window.innerWidth"))


def test_every_column_is_displayed_readably_at_common_window_widths(
    agent: AgentProcess, browser: WebDriver, module_lab: Lab
) -> None:
    """What a person sees, not the DOM: rendered sizes and positions (getBoundingClientRect,
    scrollWidth against clientWidth for clipped text) and Selenium's rendered text, for a real
    denied IPv6 row (the longest addresses), at several window widths."""
    lab = module_lab
    sign_in(browser, mint_link(agent))
    sport = str(syn(lab, "v6", 22))
    assert wait_until(lambda: sport in {r["sport"] for r in flow_rows(browser)}, 5)
    browser.find_element(By.ID, "pause").click()  # the rows stay put while they are measured
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        for width in WIDTHS:
            browser.set_window_size(width, 900)
            assert wait_until(lambda w=width: window_width(browser) == w, 3)
            time.sleep(0.3)
            browser.save_screenshot(str(ARTIFACTS / f"viewer-{width}.png"))
            g = browser.execute_script(GEOMETRY_JS, sport)
            assert g["cells"], f"{width} px: the denied row is not in the table"
            at = f"{width} px wide"
            # The visible part of the table: the section's box, within the window.
            sec = g["section"]
            lo = max(0.0, sec["left"])
            hi = min(float(g["viewport"]), sec["left"] + sec["clientWidth"])
            # Horizontal scrolling is a last resort, not needed at these widths.
            assert sec["scrollWidth"] <= sec["clientWidth"], (at, sec)
            assert g["pageScrollWidth"] <= g["viewport"], (at, g["pageScrollWidth"])

            heads = browser.find_elements(By.CSS_SELECTOR, "#flows thead th")
            assert [h.text for h in heads] == HEADERS, at  # rendered text: nothing hidden
            for name, box in zip(HEADERS, g["heads"], strict=True):
                assert box["width"] >= MIN_CELL_PX, (at, name, box)
                assert lo - 0.5 <= box["left"] and box["right"] <= hi + 0.5, (at, name, box, lo, hi)
                assert box["scrollWidth"] <= box["clientWidth"], (at, f"{name!r} clipped", box)
            for cls, box in g["cells"].items():
                assert box["width"] >= MIN_CELL_PX, (at, cls, box)
                assert lo - 0.5 <= box["left"] and box["right"] <= hi + 0.5, (at, cls, box, lo, hi)
                if cls not in ("src", "dst"):  # addresses may be ellipsised, not the rest
                    assert box["scrollWidth"] <= box["clientWidth"], (at, f"{cls} clipped", box)
            for cls in ("src", "dst", "rule"):
                assert g["cells"][cls]["width"] >= READABLE_PX, (at, cls, g["cells"][cls])

            row = browser.find_element(
                By.XPATH, f"//tbody[@id='rows']/tr[td[@class='c-sport' and text()='{sport}']]"
            )
            shown = {
                c: row.find_element(By.CSS_SELECTOR, f"td.c-{c}").text
                for c in ("verdict", "src", "dst", "dport", "rule")
            }
            assert shown["rule"] == "1002 no-ssh", (at, shown)
            assert (shown["verdict"], shown["dport"]) == ("deny", "22"), (at, shown)
            assert shown["src"] == lab.peer_v6 and shown["dst"] == lab.host_v6, (at, shown)
            if width >= 1920:  # room for whole IPv6 addresses
                for cls in ("src", "dst"):
                    box = g["cells"][cls]
                    assert box["scrollWidth"] <= box["clientWidth"], (at, f"{cls} clipped", box)

            # The side panel: beside the table when there is room, else below it; never over it.
            aside, m = g["aside"], g["map"]
            if width >= SIDE_BY_SIDE:
                assert sec["right"] <= aside["left"], (at, aside, sec)
                assert aside["right"] <= g["viewport"], (at, aside)
            else:
                assert aside["top"] >= sec["bottom"], (at, aside, sec)
            assert m["width"] >= 200 and m["right"] <= g["viewport"], (at, m)
    finally:
        browser.set_window_size(1400, 900)
        browser.find_element(By.ID, "pause").click()
    assert wait_until(lambda: window_width(browser) == 1400, 3)


def test_page_keeps_up_at_1000_events_per_second(
    agent: AgentProcess, browser: WebDriver, module_lab: Lab
) -> None:
    lab = module_lab
    browser.execute_script("""
      window.__lag = []; window.__rateMax = 0; let last = performance.now();
      setInterval(() => {
        const now = performance.now(); window.__lag.push(now - last - 100); last = now;
        const r = Number(document.getElementById('deny-rate').textContent);
        window.__rateMax = Math.max(window.__rateMax, r);
      }, 100);
    """)
    total0 = int(text(browser, "total"))
    file0 = len(flows(agent))
    n = 5000
    # 100 new denied flows every 0.1 s (about 1,000 events/s, less the sending time).
    udp_to(lab, "v4", range(20000, 20000 + n), pace=100)
    t0 = time.monotonic()
    browser.execute_script("return 1")
    assert time.monotonic() - t0 < 2.0, "the page did not answer within 2 s"
    assert wait_until(lambda: len(flows(agent)) >= file0 + n, 15)
    produced = len(flows(agent)) - file0
    assert wait_until(lambda: int(text(browser, "total")) - total0 == produced, 10), (
        text(browser, "total"),
        total0,
        produced,
    )
    assert len(rows(browser)) <= TABLE_CAP
    lag = sorted(browser.execute_script("return window.__lag"))
    assert lag and lag[len(lag) // 2] < 500, f"timer lag median {lag[len(lag) // 2]:.0f} ms"
    assert browser.execute_script("return window.__rateMax") > 200
    assert text(browser, "lost") == "0"

    # A full table scrolls in its own box: scrolled to its last row, the column headers and the
    # side panel are still on screen (1400 x 900).
    browser.find_element(By.ID, "pause").click()
    try:
        seen = browser.execute_script("""
          const sec = document.querySelector('section.table');
          sec.scrollTop = sec.scrollHeight;
          const top = (el) => el.getBoundingClientRect().top;
          const rows = document.querySelectorAll('#rows tr');
          return {scrolled: sec.scrollTop, box: top(sec), head: top(document.querySelector('th')),
                  last: rows[rows.length - 1].getBoundingClientRect().bottom,
                  bottom: sec.getBoundingClientRect().bottom,
                  aside: top(document.querySelector('aside')), height: window.innerHeight};""")
        assert seen["scrolled"] > 0, seen
        assert abs(seen["head"] - seen["box"]) <= 1, seen  # the headers stuck at the top
        assert seen["last"] <= seen["bottom"] <= seen["height"], seen
        assert 0 <= seen["aside"] < seen["height"], seen
        assert browser.find_element(By.CSS_SELECTOR, "#flows th:nth-child(9)").text == "rule"
    finally:
        browser.find_element(By.ID, "pause").click()


def test_lost_counter_shows_a_forced_gap(
    lab: Lab, agent_factory: AgentFactory, tmp_path: Path, browser: WebDriver
) -> None:
    """A one-page ring buffer (under 50 events) and a burst of 3,000 new flows: the kernel
    loses events, the agent reports them as lost records, the page counts them all."""
    policy = write_policy(tmp_path / "policy.json", RULES, "deny")
    small = start_agent(
        agent_factory(
            lab, policy, api=f"127.0.0.1:{free_port()}", extra_args=["--ringbuf-pages", "1"]
        )
    )
    sign_in(browser, mint_link(small))
    assert text(browser, "lost") == "0"
    udp_to(lab, "v4", range(40000, 43000))

    def kernel_lost() -> int:
        return int(api_stats(small)["pipeline"]["source"]["kernel_lost"])

    assert wait_until(lambda: kernel_lost() > 0, 10), api_stats(small)["pipeline"]
    time.sleep(1.0)  # the agent reads the kernel's counter twice a second
    lost = kernel_lost()
    assert wait_until(lambda: text(browser, "lost") == str(lost), 5), (text(browser, "lost"), lost)
    assert "kernel" in str(browser.find_element(By.ID, "lost").get_attribute("title"))
    lost_rows = [r for r in rows(browser) if r["lost"]]
    assert lost_rows and all("lost at kernel" in "".join(r["cells"].values()) for r in lost_rows)


def test_a_group_rule_shows_its_groups_by_name(
    agent: AgentProcess, browser: WebDriver, module_lab: Lab
) -> None:
    """A deny by a rule naming an address group: the rule cell names the group, its title
    says which end it is, and the rule filter finds it by the group's name."""
    lab = module_lab
    api = api_of(agent)
    r = api.call("PUT", "/groups/lab-peer", {"members": [lab.peer_v4, lab.peer_v6]})
    assert r.status == 201, str(r)
    grp_rule = {
        "rule_id": 1010,
        "name": "grp",
        "src_group": "lab-peer",
        "dst_port": 2222,
        "protocol": "tcp",
        "action": "deny",
        "priority": 250,
    }
    assert api.call("POST", "/policies", grp_rule).status == 201
    try:
        sign_in(browser, mint_link(agent))
        sport = syn(lab, "v4", 2222)
        want = "1010 grp (from lab-peer)"
        assert wait_until(lambda: any(r["sport"] == str(sport) for r in flow_rows(browser)), 10), (
            flow_rows(browser)[:3]
        )
        row = next(r for r in flow_rows(browser) if r["sport"] == str(sport))
        assert row["rule"] == want, row
        title = browser.execute_script(
            "return Array.from(document.querySelectorAll('#rows td.c-rule'))"
            ".find(td => td.textContent === arguments[0]).title",
            want,
        )
        assert "source group lab-peer" in title, title
        browser.find_element(By.ID, "f-rule").send_keys("lab-peer")
        time.sleep(0.6)  # the page redraws four times a second
        shown = flow_rows(browser)
        assert shown and all(r["rule"] == want for r in shown), shown
        browser.find_element(By.ID, "f-clear").click()
    finally:
        api.call("DELETE", "/policies/1010")
        api.call("DELETE", "/groups/lab-peer")


def test_a_staged_verdict_shows_as_a_badge_and_filters(
    agent: AgentProcess, browser: WebDriver, module_lab: Lab
) -> None:
    """Needs the classifier's staged view (engineer A). docs/contract.md §6: a flow a staged
    rule would decide otherwise shows a "would deny by rule N" badge in the staged column (which
    appears with it; its title names the rule), is reported even when its enforced verdict is
    allow, and the staged filter keeps exactly such flows, by staged verdict too. The columns
    stay readable at 1400 px with the staged one shown (its badge may be ellipsised, like an
    address: the cell's title has it whole)."""
    lab = module_lab
    api = api_of(agent)
    staged_rules = [
        # Enforced: allowed (no event of its own); staged: would deny.
        {
            "rule_id": 1021,
            "name": "open-7321",
            "dst_port": 7321,
            "protocol": "udp",
            "action": "allow",
        },
        {
            "rule_id": 1020,
            "name": "trial-7321",
            "dst_port": 7321,
            "protocol": "udp",
            "action": "deny",
            "priority": 300,
            "mode": "staged",
        },
        # Enforced: the default deny; staged: would allow.
        {
            "rule_id": 1022,
            "name": "trial-2323",
            "dst_port": 2323,
            "protocol": "tcp",
            "action": "allow",
            "mode": "staged",
        },
    ]
    for r in staged_rules:
        assert api.call("POST", "/policies", r).status == 201
    try:
        sign_in(browser, mint_link(agent))
        udp_to(lab, "v4", [7321])
        sport = syn(lab, "v4", 2323)

        def staged_rows() -> list[dict[str, str]]:
            return [r for r in flow_rows(browser) if r.get("staged")]

        assert wait_until(lambda: {r["dport"] for r in staged_rows()} >= {"7321", "2323"}, 10), (
            flow_rows(browser)[:4]
        )
        heads = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#flows thead th")]
        assert heads == [*HEADERS[:9], "staged", *HEADERS[9:]]
        would_deny = next(r for r in staged_rows() if r["dport"] == "7321")
        assert (would_deny["verdict"], would_deny["rule"]) == ("allow", "1021 open-7321")
        assert would_deny["staged"] == "would deny by rule 1020"
        would_allow = next(r for r in staged_rows() if r["sport"] == str(sport))
        assert (would_allow["verdict"], would_allow["rule"]) == ("deny", "default")
        assert would_allow["staged"] == "would allow by rule 1022"
        title = browser.execute_script(
            "return Array.from(document.querySelectorAll('#rows td.c-staged'))"
            ".find(td => td.textContent === arguments[0]).title",
            "would deny by rule 1020",
        )
        assert "staged rule 1020 trial-7321" in title and "priority 300" in title, title

        def shown_after(value: str) -> list[dict[str, str]]:
            Select(browser.find_element(By.ID, "f-staged")).select_by_value(value)
            time.sleep(0.6)  # the page redraws four times a second
            return flow_rows(browser)

        only = shown_after("any")
        assert only and all(r["staged"] for r in only), only
        denying = shown_after("deny")
        assert denying and all(r["staged"].startswith("would deny") for r in denying), denying
        browser.find_element(By.ID, "f-clear").click()
        top = text(browser, "top-rules")
        assert "1020 trial-7321 (staged: would deny)" in top, top

        # Readable with the staged column shown.
        browser.find_element(By.ID, "pause").click()
        try:
            time.sleep(0.3)
            g = browser.execute_script(GEOMETRY_JS, str(sport))
            assert g["cells"], "the staged row is not in the table"
            for cls in ("src", "dst", "rule", "staged"):
                assert g["cells"][cls]["width"] >= READABLE_PX, (cls, g["cells"][cls])
        finally:
            browser.find_element(By.ID, "pause").click()
    finally:
        for r in staged_rules:
            api.call("DELETE", f"/policies/{r['rule_id']}")


def fleet_record(host: str, seq: int, src_port: int, direction: str = "ingress") -> str:
    """A flow record of another agent of the fleet, as it sends it to the flows topic."""
    return json.dumps(
        {
            "schema": "microseg.flow/v1",
            "type": "flow",
            "seq": seq,
            "time": f"2026-11-22T10:01:{seq:02d}.123456789Z",
            "host": host,
            "iface": "eth0",
            "direction": direction,
            "verdict": "deny",
            "src_ip": "10.9.0.7",
            "dst_ip": "10.9.0.5",
            "src_port": src_port,
            "dst_port": 22,
            "protocol": "tcp",
            "tcp_flags": "SYN",
            "packets": 1,
            "bytes": 60,
            "kind": "new",
            "rule": {"rule_id": 1002, "name": "no-ssh", "priority": 200, "action": "deny"},
            "policy_generation": 1,
        }
    )


def test_the_fleet_view_shows_every_hosts_records_with_a_host_column(
    agent: AgentProcess, browser: WebDriver, module_lab: Lab, kafka_broker: KafkaBroker
) -> None:
    sign_in(browser, mint_link(agent))  # a fresh page (the fleet view off)
    toggle = browser.find_element(By.ID, "fleet-toggle")
    assert wait_until(toggle.is_displayed, 10)  # /status says there is a fleet feed
    assert not browser.find_elements(By.ID, "h-host")

    # Two hosts' records on the topic, one of them egress (its source is the host's own end),
    # then more once the page follows the fleet feed.
    kcat_produce(
        kafka_broker.bootstrap,
        FLEET_TOPIC,
        [fleet_record("node-a", 1, 41001), fleet_record("node-b", 1, 41002, "egress")],
    )
    browser.find_element(By.ID, "fleet").click()
    assert wait_until(lambda: browser.find_elements(By.ID, "h-host"), 5)
    assert wait_until(lambda: conn_state(browser) == "live", 10)
    kcat_produce(
        kafka_broker.bootstrap,
        FLEET_TOPIC,
        [fleet_record("node-a", 2, 41003), fleet_record("node-b", 2, 41004)],
    )

    def fleet_rows() -> list[dict[str, str]]:
        return [r for r in flow_rows(browser) if r.get("src", "") == "10.9.0.7"]

    assert wait_until(lambda: len(fleet_rows()) == 4, 30), flow_rows(browser)
    got = sorted((r["host"], r["sport"]) for r in fleet_rows())
    assert got == [
        ("node-a", "41001"),
        ("node-a", "41003"),
        ("node-b", "41002"),
        ("node-b", "41004"),
    ]
    assert all(r["verdict"] == "deny" and r["rule"] == "1002 no-ssh" for r in fleet_rows())
    # Only the fleet's records (the local agent's own are not on this topic), the host's
    # header cell readable, and the hosts as nodes of the map.
    assert len(flow_rows(browser)) == 4
    assert browser.find_element(By.ID, "h-host").text == "host"
    assert wait_until(
        lambda: (
            {"node-a", "node-b"}
            <= {t.text for t in browser.find_elements(By.CSS_SELECTOR, "#map text.host")}
        ),
        5,
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "#map rect.host")) == 2

    # Back to the agent's own feed: its flows, no host column.
    browser.find_element(By.ID, "fleet").click()
    assert wait_until(lambda: not browser.find_elements(By.ID, "h-host"), 5)
    assert wait_until(lambda: conn_state(browser) == "live", 10)
    syn(module_lab, "v4", 22)
    assert wait_until(lambda: any(r["dport"] == "22" for r in flow_rows(browser)), 10)
    assert not fleet_rows() and all("host" not in r for r in flow_rows(browser))
