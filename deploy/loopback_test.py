#!/usr/bin/env python3
"""Two Business Connector instances behind HAProxy on loopback.

Started by deploy/test-loopback.sh; see deploy/README.md. Starts one cucm-sim, two
gateways that each get half of the simulated CUCM's allowance, and HAProxy with
deploy/haproxy.cfg in front, all on free loopback ports. Then checks:

  (a) order   a burst of alternating logins/logouts on ONE phone, sent through the
              balancer while the first is still at CUCM, reaches the simulator in the
              order sent, never two at once, all through one instance (any reordering
              would turn into codes 18/19);
  (b) kill    SIGKILL of one instance under load loses only the requests it held in
              flight; every request started after the kill succeeds (the other
              instance takes the phones);
  (c) drain   SIGTERM of one instance under load: zero failed requests, /readyz 503
              at once, the balancer takes the instance out, the instance exits 0.

With BC_TEST_POSTGRES_URL set (CI's PostgreSQL, history/ci-postgres.sh) both instances
share one PostgreSQL history, as in the README's "Running several", and two more:

  (d) shared  each instance lists the other's records, and every login/logout the
              drained instance answered while draining is in the history;
  (e) outage  with BC_PG_STATE_FILE too (the server can be stopped): PostgreSQL stopped
              for PG_OUTAGE_S and started again under load: zero failed answers, every
              login/logout answered is recorded, latency before/during/after reported.

Every wait polls a condition with a deadline; every process started here is ended
(by its own pid) on every exit path. Only the standard library is used.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BC_BIN = os.environ.get("BC_BIN", os.path.join(TARGET, "release", "business-connector"))
SIM_BIN = os.environ.get("SIM_BIN", os.path.join(TARGET, "release", "cucm-sim"))
HAPROXY = os.environ.get("HAPROXY", shutil.which("haproxy") or "/usr/sbin/haproxy")
HAPROXY_CFG = os.path.join(ROOT, "deploy", "haproxy.cfg")

CREDS = "<appID>bcapp</appID><appCertificate>bcsecret</appCertificate>"
CLUSTER = "LAB"
SIM_MAX_CONCURRENT = 5  # CUCM's "Maximum Concurrent Requests"
SIM_RATE = 200  # the EM calls per second we allow ourselves against this CUCM
INSTANCES = 2
DRAIN_MS = 2000  # gateways' drain: several balancer checks (CHECK_INTER_MS) long
CHECK_INTER_MS = 100
SIM_LATENCY_MS = 20
WORKERS = 8  # load threads, each owning DEVICES_PER_WORKER devices
DEVICES_PER_WORKER = 4
TOTAL_BUDGET_S = 300  # the whole run; every phase also has its own bounds
PG_URL = os.environ.get("BC_TEST_POSTGRES_URL")
# BC_COORDINATION=1 (needs BC_TEST_POSTGRES_URL): the instances share CUCM's whole
# allowance through PostgreSQL ([coordination]) instead of 1/N each.
COORDINATION = os.environ.get("BC_COORDINATION") == "1"
PG_STATE_FILE = os.environ.get("BC_PG_STATE_FILE")
PG_OUTAGE_S = 5
OUTAGE_FIRST_DEVICE = 1000
# Instances of this run, in a database other runs may have written to.
RUN_ID = f"{os.getpid()}-{int(time.time())}"

STARTED = time.monotonic()


class Failed(Exception):
    """A check or a setup step failed; the message says which."""


def log(message):
    print(f"[{time.monotonic() - STARTED:7.2f}s] {message}", flush=True)


def wait_until(what, timeout_s, condition, interval_s=0.01):
    """Polls `condition` until it returns a truthy value; Failed after `timeout_s`."""
    give_up = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > give_up or time.monotonic() - STARTED > TOTAL_BUDGET_S:
            raise Failed(f"timed out after {timeout_s}s waiting until {what}")
        time.sleep(interval_s)


def free_port():
    """A port the kernel just called free. Only for HAProxy's bind, which cannot take
    port 0 and report it; the start is retried if another process took it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device(n):
    return f"SEP{n:012X}"


def instance_name(index):
    return f"gw{index + 1}-{RUN_ID}" if PG_URL else f"gw{index + 1}"


def utc_rfc3339(wall_time):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall_time)) + f".{int(wall_time * 1000) % 1000:03d}Z"


# --- processes ---------------------------------------------------------------------


class Process:
    """A child with its output in a file, ended by pid on cleanup."""

    every: "list[Process]" = []  # noqa: RUF012 (the registry of every child, for cleanup)

    def __init__(self, name, argv, workdir, env=None):
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        Process.every.append(self)

    def output(self):
        with open(self.log_path, "r", errors="replace") as f:
            return f.read()

    def wait_for_line(self, pattern, timeout_s):
        regex = re.compile(pattern)

        def found():
            if self.popen.poll() is not None:
                raise Failed(f"{self.name} exited ({self.popen.returncode}):\n{self.tail()}")
            match = regex.search(self.output())
            return match

        return wait_until(f"{self.name} logs /{pattern}/", timeout_s, found)

    def tail(self, lines=15):
        return "\n".join(self.output().splitlines()[-lines:])

    def alive(self):
        return self.popen.poll() is None

    def signal(self, sig):
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self):
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self.log_file.close()


def cleanup():
    for process in reversed(Process.every):
        try:
            process.stop()
        except Exception as error:  # noqa: BLE001 (keep ending the others)
            print(f"cleanup of {process.name}: {error}", file=sys.stderr)
    Process.every.clear()


# --- HTTP --------------------------------------------------------------------------


def http_get(address, path, timeout_s=5):
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def http_post(address, path, body, timeout_s=5):
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


class Client:
    """One keep-alive connection to the balancer; the three request styles it accepts."""

    def __init__(self, address):
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.connection = None

    def call(self, operation, dev, user=None, style="path"):
        """(http status or None, code or None, error text or None, userID or None)."""
        if style == "path":
            path = f"/api/{operation}/{dev}" + (f"/{user}" if user else "")
            body = urllib.parse.urlencode({"xml": f"<request>{CREDS}</request>"})
            content_type = "application/x-www-form-urlencoded"
        elif style in ("form", "query"):  # device only in the url-encoded XML of field xml
            path = f"/api/{operation}"
            xml = (
                f"<request>{CREDS}<deviceName>{dev}</deviceName>"
                + (f"<userID>{user}</userID>" if user else "")
                + "</request>"
            )
            body = urllib.parse.urlencode({"xml": xml})
            content_type = "application/x-www-form-urlencoded"
            if style == "query":  # GET /api/login?xml=...
                path, body = f"{path}?{body}", ""
        else:  # "xml": device only in a raw text/xml body, over several lines
            path = f"/api/{operation}"
            body = (
                f"<request>\n  {CREDS}\n  <deviceName>{dev}</deviceName>\n"
                + (f"  <userID>{user}</userID>\n" if user else "")
                + "</request>\n"
            )
            content_type = "text/xml"
        for attempt in (1, 2):
            fresh = self.connection is None
            if fresh:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                method = "POST" if body else "GET"
                headers = {"Content-Type": content_type} if body else {}
                self.connection.request(method, path, body=body.encode() if body else None, headers=headers)
                response = self.connection.getresponse()
                text = response.read().decode("utf-8", "replace")
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                match = re.search(r"<code>(\d+)</code>", text)
                code = int(match.group(1)) if match else None
                error = None if response.status == 200 and code is not None else text[:200]
                user_match = re.search(r"<userID>([^<]*)</userID>", text)
                user_id = user_match.group(1) if user_match and user_match.group(1) else None
                return response.status, code, error, user_id
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                # HAProxy may close an idle client connection between two requests;
                # that request was never sent, so it is sent again on a new one. A
                # failure on a fresh connection is a real failure.
                if fresh or attempt == 2 or isinstance(exc, socket.timeout):
                    return None, None, f"{type(exc).__name__}: {exc}", None
        return None, None, "unreachable", None

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


# --- the set-up --------------------------------------------------------------------


class Lab:
    def __init__(self, workdir):
        self.workdir = workdir
        self.gateways = [None] * INSTANCES
        self.ports = [None] * INSTANCES
        self.generation = [0] * INSTANCES

    def start_sim(self):
        # Phases (b) and (c) use 20 on, (d) 900 and 901, (e) OUTAGE_FIRST_DEVICE on.
        devices = OUTAGE_FIRST_DEVICE + WORKERS * DEVICES_PER_WORKER
        self.sim = Process(
            "cucm-sim",
            [
                SIM_BIN,
                "--listen",
                "127.0.0.1:0",
                "--devices",
                str(devices),
                "--users",
                str(devices),
                "--max-concurrent",
                str(SIM_MAX_CONCURRENT),
                "--latency-ms",
                str(SIM_LATENCY_MS),
                "--threads",
                "1",
            ],
            self.workdir,
            {"RUST_LOG": "warn"},
        )
        self.sim_url = self.sim.wait_for_line(r"(http://127\.0\.0\.1:\d+/emservice/\S+)", 30).group(1)
        control = self.sim.wait_for_line(r"control: http://(127\.0\.0\.1:\d+)/_sim", 30)
        self.sim_control = control.group(1)
        log(f"cucm-sim at {self.sim_url}, control {self.sim_control}")

    def sim_stats(self, with_log=False):
        status, body = http_get(self.sim_control, "/_sim/stats" + ("" if with_log else "?log=false"))
        if status != 200:
            raise Failed(f"sim stats: HTTP {status}")
        return json.loads(body)

    def sim_reset(self):
        http_post(self.sim_control, "/_sim/reset", "")

    def sim_latency(self, ms):
        status, body = http_post(self.sim_control, "/_sim/faults", json.dumps({"latency": {"fixed_ms": ms}}))
        if status != 200:
            raise Failed(f"setting sim latency: HTTP {status} {body}")

    def gateway_config(self, index):
        # Each instance gets 1/N of what CUCM allows: together they stay
        # within CUCM's gate of SIM_MAX_CONCURRENT calls and SIM_RATE calls/s. With
        # coordination they share the whole of it.
        share = 1 if COORDINATION else INSTANCES
        coordination = f"[coordination]\nenabled = true\ninstances = {INSTANCES}\n" if COORDINATION else ""
        path = os.path.join(self.workdir, f"gw{index + 1}.toml")
        with open(path, "w") as f:
            f.write(
                f"""listen = "127.0.0.1:0"
workers = 1
deadline_ms = 30000
drain_ms = {DRAIN_MS}
shutdown_grace_ms = 5000

[history]
{self.history_store(index)}
instance = "{instance_name(index)}"

{coordination}
[[cluster]]
code = "{CLUSTER}"
nodes = ["{self.sim_url}"]
max_concurrent = {SIM_MAX_CONCURRENT // share}
max_requests_per_second = {SIM_RATE // share}
burst = 5
timeout_ms = 10000
"""
            )
        return path

    def history_store(self, index):
        if PG_URL:
            return f'url = "{PG_URL}"'
        return f'path = "{os.path.join(self.workdir, f"history-gw{index + 1}.sqlite")}"'

    def start_gateway(self, index, port=None):
        """Port 0 the first time; a restart takes the same port so HAProxy's config holds."""
        self.generation[index] += 1
        argv = [BC_BIN, "--config", self.gateway_config(index)]
        if port is not None:
            argv += ["--listen", f"127.0.0.1:{port}"]
        process = Process(f"gw{index + 1}.{self.generation[index]}", argv, self.workdir, {"RUST_LOG": "info"})
        match = process.wait_for_line(r"listen=(127\.0\.0\.1:(\d+))", 30)
        self.gateways[index] = process
        self.ports[index] = int(match.group(2))
        log(f"{process.name} serving on {match.group(1)}")
        return process

    def gateway_address(self, index):
        return f"127.0.0.1:{self.ports[index]}"

    def start_haproxy(self):
        self.admin_socket = os.path.join(self.workdir, "haproxy.sock")
        for attempt in range(5):
            port = free_port()
            env = {
                "BC_LB_BIND": f"127.0.0.1:{port}",
                "BC_GW1": self.gateway_address(0),
                "BC_GW2": self.gateway_address(1),
                "BC_CHECK_INTER": f"{CHECK_INTER_MS}ms",
                "BC_LB_ADMIN_SOCKET": self.admin_socket,
            }
            process = Process(f"haproxy.{attempt}", [HAPROXY, "-db", "-f", HAPROXY_CFG], self.workdir, env)

            def listening(process=process, port=port):
                if not process.alive():
                    return "exited"
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        return "up"
                except OSError:
                    return None

            if wait_until("haproxy listens", 15, listening) == "up":
                self.haproxy = process
                self.lb = f"127.0.0.1:{port}"
                log(f"haproxy on {self.lb}")
                return
            log(f"haproxy could not start on port {port}:\n{process.tail()}")
        raise Failed("haproxy did not start")

    def server_states(self):
        """{'gw1': 'UP'|'DOWN'|...} from HAProxy's runtime API."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.admin_socket)
            s.sendall(b"show stat\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        states = {}
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "gateways" and row.get("svname") in ("gw1", "gw2"):
                states[row["svname"]] = row["status"]
        return states

    def wait_servers(self, expected, timeout_s=30):
        def matches():
            states = self.server_states()
            # Exact: "UP 1/2" is an instance on its way down, "DOWN 1/2" on its way up.
            return all(states.get(k) == v for k, v in expected.items()) and states

        return wait_until(f"haproxy sees {expected}", timeout_s, matches)

    def metrics(self, index):
        status, text = http_get(self.gateway_address(index), "/metrics")
        if status != 200:
            raise Failed(f"/metrics of instance {index + 1}: HTTP {status}")
        return text

    def requests_answered(self, index):
        """bc_requests_total summed over every label of instance `index`."""
        text = self.metrics(index)
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("bc_requests_total{")
        )

    def queue_depth(self, index):
        text = self.metrics(index)
        for line in text.splitlines():
            if line.startswith("bc_queue_depth{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


# --- load --------------------------------------------------------------------------


class Load:
    """WORKERS threads; each alternates login/logout on its own devices, one request at
    a time per thread, so per-device order is the client's own. Records every request."""

    def __init__(self, lab, first_device):
        self.lab = lab
        self.records = []  # (start, end, device, operation, status, code, error, after_loss)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = []
        self.first_device = first_device

    def worker(self, number):
        client = Client(self.lab.lb)
        devices = [self.first_device + number * DEVICES_PER_WORKER + i for i in range(DEVICES_PER_WORKER)]
        # Known state of each device: the user logged in (device n uses user n), None
        # for nobody, "?" after a lost request (it may or may not have happened).
        state = {n: None for n in devices}
        unsure = set()  # devices whose next state change may meet a lost request's effect
        styles = ["path", "form", "xml", "query"]
        i = 0
        while not self.stop.is_set() and time.monotonic() - STARTED < TOTAL_BUDGET_S:
            n = devices[i % len(devices)]
            style = styles[(i // len(devices)) % len(styles)]
            i += 1
            if state[n] == "?":
                operation, user = "getloggedinuser", None
            elif state[n] is None:
                operation, user = "login", f"user{n}"
            else:
                operation, user = "logout", None
            start = time.monotonic()
            status, code, error, current = client.call(operation, device(n), user, style)
            end = time.monotonic()
            after_loss = n in unsure and operation != "getloggedinuser"
            if code == 0:
                if operation == "getloggedinuser":
                    state[n] = current
                else:
                    state[n] = f"user{n}" if operation == "login" else None
                    unsure.discard(n)
            elif after_loss and code in (18, 19):
                # The lost request's effect landed after all: take the state CUCM has.
                state[n] = f"user{n}" if code == 18 else None
                unsure.discard(n)
            else:
                state[n] = "?"
                unsure.add(n)
            with self.lock:
                self.records.append((start, end, device(n), operation, status, code, error, after_loss))
        client.close()

    def start(self):
        for number in range(WORKERS):
            thread = threading.Thread(target=self.worker, args=(number,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def count(self):
        with self.lock:
            return len(self.records)

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
            if thread.is_alive():
                raise Failed("a load thread did not finish within 60 s")
        return list(self.records)


# --- the checks --------------------------------------------------------------------


class Results:
    def __init__(self):
        self.rows = []

    def check(self, name, ok, detail):
        self.rows.append((name, bool(ok), detail))
        log(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")

    def summary(self):
        print("\n==== loopback summary ====")
        for name, ok, detail in self.rows:
            print(f"{'PASS' if ok else 'FAIL'}  {name:34} {detail}")
        passed = sum(1 for _, ok, _ in self.rows if ok)
        failed = len(self.rows) - passed
        print(f"loopback: {passed} passed, {failed} failed")
        return failed == 0 and passed > 0


def phase_order(lab, results):
    """(a) Ten operations on one phone, each sent once the previous one is at the
    gateway, while the first is still at CUCM: the gateway must hand them to CUCM in
    that order, one at a time. Styles alternate so the body hashing is exercised."""
    n = 1
    users = [f"user{u}" for u in range(1, 6)]
    plan = []
    for u in users:
        plan += [("login", u), ("logout", None)]
    styles = ["path", "xml", "form", "query"]
    before = [lab.requests_answered(i) for i in range(INSTANCES)]
    lab.sim_reset()
    # Hold the first call at CUCM long enough to line the others up behind it.
    lab.sim_latency(5000)
    answers = [None] * len(plan)

    def send(k):
        operation, user = plan[k]
        answers[k] = Client(lab.lb).call(operation, device(n), user, styles[k % len(styles)])

    threads = []
    for k in range(len(plan)):
        thread = threading.Thread(target=send, args=(k,), daemon=True)
        thread.start()
        threads.append(thread)
        if k == 0:
            wait_until("the first login is at CUCM", 10, lambda: lab.sim_stats()["in_flight_ops"] == 1)
        else:
            # Arrived = waiting in a gateway queue, or already received by CUCM.
            def arrived(k=k):
                stats = lab.sim_stats()
                at_cucm = stats["calls_login"] + stats["calls_logout"]
                queued = sum(lab.queue_depth(i) for i in range(INSTANCES))
                return at_cucm + queued >= k + 1

            wait_until(f"operation {k + 1} is at a gateway", 10, arrived)
    lab.sim_latency(SIM_LATENCY_MS)  # the held first call keeps its 5 s; the rest are quick
    for thread in threads:
        thread.join(timeout=40)
    codes = [a[1] if a else None for a in answers]
    results.check("order: every answer code 0", codes == [0] * len(plan), f"codes {codes}")
    stats = lab.sim_stats(with_log=True)
    seen = [
        (r["kind"], r["user"] if r["kind"] == "login" else None)
        for r in stats["log"]
        if device(n) in r["devices"] and r["kind"] in ("login", "logout")
    ]
    expected = [(op, user) for op, user in plan]
    results.check(
        "order: CUCM saw the sent order",
        seen == expected,
        f"{len(seen)} calls, {sum(1 for a, b in zip(seen, expected) if a == b)} in place",
    )
    results.check(
        "order: one call at a time per phone",
        stats["max_concurrent_per_device"] == 1,
        f"max_concurrent_per_device {stats['max_concurrent_per_device']}",
    )
    after = [lab.requests_answered(i) for i in range(INSTANCES)]
    served = [int(a - b) for a, b in zip(after, before)]
    results.check(
        "order: one instance took the phone",
        sorted(served) == [0, len(plan)],
        f"requests per instance {served}",
    )


def devices_served_by(process):
    return set(re.findall(r'device="?(SEP[0-9A-F]{12})', process.output()))


def phase_kill(lab, results):
    """(b) SIGKILL one instance under load."""
    lab.sim_reset()
    load = Load(lab, first_device=20)
    load.start()
    try:
        return kill_under(lab, results, load)
    finally:
        load.stop.set()  # also when a wait failed: no thread outlives its phase


def kill_under(lab, results, load):
    wait_until("200 requests answered before the kill", 60, lambda: load.count() >= 200)
    victim = lab.gateways[0]
    # Before the kill: which phones each instance served (all four request styles).
    victim_devices = devices_served_by(victim)
    other_devices = devices_served_by(lab.gateways[1])
    both = victim_devices & other_devices
    results.check(
        "hash: each phone on one instance",
        victim_devices and other_devices and not both,
        f"{len(victim_devices)} and {len(other_devices)} phones, {len(both)} on both",
    )
    signalled = time.monotonic()
    victim.signal(signal.SIGKILL)
    victim.popen.wait(timeout=10)
    killed = time.monotonic()  # surely dead from here on
    log(f"SIGKILLed {victim.name} ({len(victim_devices)} phones were on it)")
    lab.wait_servers({"gw1": "DOWN", "gw2": "UP"}, timeout_s=10)
    down_after = time.monotonic() - killed
    at_kill = load.count()
    wait_until("300 more requests answered after the kill", 60, lambda: load.count() >= at_kill + 300)
    records = load.finish()

    before = [r for r in records if r[1] < signalled]
    across = [r for r in records if r[0] < killed and r[1] >= signalled]
    after = [r for r in records if r[0] >= killed]
    failed = lambda rs: [r for r in rs if r[5] != 0 and not (r[7] and r[5] in (18, 19))]
    reconciled = [r for r in after if r[7] and r[5] in (18, 19)]
    moved = [r for r in after if r[2] in victim_devices]
    results.check(
        "kill: before the kill all succeeded",
        before and not failed(before),
        f"{len(before)} requests, {len(failed(before))} failed",
    )
    results.check(
        "kill: lost at most what was in flight",
        len(failed(across)) <= WORKERS,
        f"{len(across)} in flight at the kill, {len(failed(across))} lost (≤ {WORKERS} load threads)",
    )
    results.check(
        "kill: every request after it succeeded",
        after and not failed(after),
        f"{len(after)} requests, {len(failed(after))} failed, {len(reconciled)} met a lost request's effect (18/19)"
        + (f"; first failure {failed(after)[0]}" if failed(after) else ""),
    )
    results.check(
        "kill: the other instance took its phones",
        len(moved) > 0 and not failed(moved),
        f"{len(moved)} requests on the killed instance's {len(victim_devices)} phones after the kill, "
        f"{len(failed(moved))} failed (before: {len(victim_devices)} and {len(other_devices)} phones on the two); "
        f"balancer marked it DOWN after {down_after * 1000:.0f} ms",
    )


def phase_drain(lab, results):
    """(c) SIGTERM one instance under load: no request may fail."""
    # Bring the killed instance back on its port; the balancer health-checks it in.
    lab.start_gateway(0, port=lab.ports[0])
    lab.wait_servers({"gw1": "UP", "gw2": "UP"}, timeout_s=20)
    lab.sim_reset()
    load = Load(lab, first_device=20 + WORKERS * DEVICES_PER_WORKER)
    load.start()
    try:
        return drain_under(lab, results, load)
    finally:
        load.stop.set()


def drain_under(lab, results, load):
    target = lab.gateways[0]
    served_before = lambda: lab.requests_answered(0)
    wait_until("load reaches both instances", 60, lambda: load.count() >= 200 and served_before() >= 20)
    target.signal(signal.SIGTERM)
    signalled = time.monotonic()
    lab.drain_signalled_wall = time.time()
    log(f"SIGTERM to {target.name}")

    def readyz_503():
        try:
            return http_get(lab.gateway_address(0), "/readyz", timeout_s=2)[0] == 503
        except OSError:
            return False

    wait_until("readyz answers 503", 2, readyz_503, interval_s=0.005)
    ready_503_after = time.monotonic() - signalled
    lab.wait_servers({"gw1": "DOWN"}, timeout_s=DRAIN_MS / 1000)
    down_after = time.monotonic() - signalled
    wait_until("the drained instance exits", DRAIN_MS / 1000 + 15, lambda: not target.alive())
    exited_after = time.monotonic() - signalled
    at_exit = load.count()
    wait_until("200 more requests answered after the exit", 60, lambda: load.count() >= at_exit + 200)
    records = load.finish()
    failures = [r for r in records if r[5] != 0]
    during = [r for r in records if r[0] >= signalled]
    output = target.output()
    drained_lines = output.split("draining", 1)[1] if "draining" in output else ""
    served_draining = len(re.findall(r"\brequest\b.*device=", drained_lines))
    # (operation, device) of every login/logout it answered while draining: the last
    # records it wrote, checked in (d) when the history is shared.
    lab.drained_changes = re.findall(r'\brequest\b.*operation="?(login|logout)"?.*? device="?([0-9A-Z]+)', drained_lines)
    results.check(
        "drain: zero failed requests",
        records and not failures,
        f"{len(records)} requests ({len(during)} after the SIGTERM), {len(failures)} failed"
        + (f"; first {failures[0]}" if failures else ""),
    )
    results.check(
        "drain: readyz 503 at once",
        ready_503_after < 0.5,
        f"after {ready_503_after * 1000:.0f} ms",
    )
    results.check(
        "drain: balancer took it out in the drain",
        down_after < DRAIN_MS / 1000,
        f"DOWN after {down_after * 1000:.0f} ms (drain {DRAIN_MS} ms); it answered {served_draining} requests while draining",
    )
    results.check(
        "drain: stopped after the drain, exit 0",
        target.popen.returncode == 0 and exited_after >= DRAIN_MS / 1000,
        f"exit {target.popen.returncode} after {exited_after * 1000:.0f} ms",
    )


def history_entries(lab, index, query):
    status, body = http_get(lab.gateway_address(index), f"/api/history?{query}", timeout_s=10)
    if status != 200:
        raise Failed(f"/api/history?{query} on instance {index + 1}: HTTP {status} {body[:200]}")
    return json.loads(body)["entries"]


def phase_shared_history(lab, results):
    """(d) One PostgreSQL history: each instance lists the other's records, and the
    drained instance's last records are there."""
    if lab.gateways[0] is None or not lab.gateways[0].alive():
        lab.start_gateway(0, port=lab.ports[0])
        lab.wait_servers({"gw1": "UP", "gw2": "UP"}, timeout_s=20)
    # One login straight to each instance, on devices no load uses.
    marks = {0: device(900), 1: device(901)}
    for index, dev in marks.items():
        client = Client(lab.gateway_address(index))
        status, code, error, _ = client.call("login", dev, "user900" if index == 0 else "user901")
        client.close()
        if code != 0:
            raise Failed(f"login on instance {index + 1}: {status} {code} {error}")
    def each_sees_the_other():
        for index, other in ((0, 1), (1, 0)):
            entries = history_entries(lab, index, f"device={marks[other]}")
            if not any(e.get("instance") == instance_name(other) for e in entries):
                return False
        return True
    seen = wait_until_or_false(10, each_sees_the_other)
    results.check(
        "shared history: each lists the other's",
        seen,
        f"gw1 lists {marks[1]} from {instance_name(1)} and gw2 lists {marks[0]} from {instance_name(0)}",
    )
    # Requests in flight at the SIGTERM carry their start time: look a little earlier.
    since = urllib.parse.quote(utc_rfc3339(getattr(lab, "drain_signalled_wall", time.time()) - 5))
    expected = getattr(lab, "drained_changes", [])
    missing = []
    for dev in sorted({dev for _, dev in expected}):
        entries = history_entries(lab, 1, f"device={dev}&since={since}&limit=1000")
        for operation in ("login", "logout"):
            answered = sum(1 for op, d in expected if (op, d) == (operation, dev))
            stored = sum(
                1 for e in entries if e.get("operation") == operation and e.get("instance") == instance_name(0)
            )
            if stored < answered:
                missing.append(f"{operation} {dev}: {stored} of {answered}")
    results.check(
        "shared history: drained instance's last records",
        expected and not missing,
        f"{len(expected)} logins/logouts answered while draining, all in the other instance's /api/history"
        if expected and not missing
        else f"{len(expected)} answered while draining; missing {missing[:5]}",
    )


def wait_until_or_false(timeout_s, condition):
    try:
        return bool(wait_until("condition", timeout_s, condition, interval_s=0.1))
    except Failed:
        return False


def store_up(lab, index):
    for line in lab.metrics(index).splitlines():
        if line.startswith("bc_history_store_up "):
            return float(line.rsplit(" ", 1)[1]) == 1.0
    return False


def ci_postgres(command):
    subprocess.run(
        ["bash", os.path.join(ROOT, "history", "ci-postgres.sh"), command],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "BC_PG_STATE_FILE": PG_STATE_FILE},
        timeout=60,
    )


def percentiles(durations):
    if not durations:
        return "no requests"
    ordered = sorted(durations)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
    return f"n={len(ordered)} p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {ordered[-1] * 1000:.1f} ms"


def phase_postgres_outage(lab, results):
    """(e) PostgreSQL stopped for PG_OUTAGE_S and started again under load."""
    lab.sim_reset()
    load = Load(lab, first_device=OUTAGE_FIRST_DEVICE)
    phase_started_wall = time.time()
    load.start()
    try:
        wait_until("load before the outage", 60, lambda: load.count() >= 300)
        ci_postgres("stop-server")
        stopped = time.monotonic()
        log(f"PostgreSQL stopped for {PG_OUTAGE_S} s")
        wait_until("both instances notice", 15, lambda: not store_up(lab, 0) and not store_up(lab, 1), interval_s=0.1)
        # The outage itself: its length is the scenario, not a synchronization.
        time.sleep(max(0.0, PG_OUTAGE_S - (time.monotonic() - stopped)))
        ci_postgres("start-server")
        started = time.monotonic()
        log("PostgreSQL started again")
        wait_until("both instances reconnect", 30, lambda: store_up(lab, 0) and store_up(lab, 1), interval_s=0.05)
        reconnected = time.monotonic() - started
        at = load.count()
        wait_until("300 more requests after the outage", 60, lambda: load.count() >= at + 300)
    finally:
        records = load.finish()
    failures = [r for r in records if r[5] != 0]
    results.check(
        "postgres outage: zero failed answers",
        records and not failures,
        f"{len(records)} requests, {len(failures)} failed" + (f"; first {failures[0]}" if failures else ""),
    )
    before = [r[1] - r[0] for r in records if r[1] < stopped]
    during = [r[1] - r[0] for r in records if r[0] >= stopped and r[0] < started + reconnected]
    after = [r[1] - r[0] for r in records if r[0] >= started + reconnected]
    results.check(
        "postgres outage: latency",
        True,
        f"before {percentiles(before)}; during {percentiles(during)}; after {percentiles(after)}",
    )
    answered = {}
    for r in records:
        if r[5] == 0 and r[3] in ("login", "logout"):
            answered[r[2]] = answered.get(r[2], 0) + 1
    since = urllib.parse.quote(utc_rfc3339(phase_started_wall - 1))

    def stored_by_device():
        stored = {}
        for dev in answered:
            entries = history_entries(lab, 1, f"device={dev}&since={since}&limit=1000")
            stored[dev] = sum(1 for e in entries if e.get("operation") in ("login", "logout"))
        return stored

    # The records that waited are written within a write interval of the reconnect.
    wait_until_or_false(10, lambda: stored_by_device() == answered)
    stored = stored_by_device()
    lost = sum(max(0, answered[d] - stored.get(d, 0)) for d in answered)
    extra = sum(max(0, stored.get(d, 0) - answered[d]) for d in answered)
    results.check(
        "postgres outage: zero lost records",
        lost == 0 and sum(answered.values()) > 0,
        f"{sum(answered.values())} logins/logouts answered, {sum(stored.values())} recorded, {lost} lost, {extra} extra; "
        f"outage {PG_OUTAGE_S} s, reconnected {reconnected * 1000:.0f} ms after the restart",
    )


def main():
    for path, what in ((BC_BIN, "business-connector"), (SIM_BIN, "cucm-sim"), (HAPROXY, "haproxy")):
        if not (path and os.access(path, os.X_OK)):
            print(f"FAIL: {what} not found at {path} (see deploy/README.md)", file=sys.stderr)
            return 2
    if COORDINATION and not PG_URL:
        print("FAIL: BC_COORDINATION=1 needs BC_TEST_POSTGRES_URL", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="bc-loopback-")
    results = Results()
    ok = False

    def on_signal(signum, _frame):
        raise SystemExit(f"stopped by signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        lab = Lab(workdir)
        lab.start_sim()
        for index in range(INSTANCES):
            lab.start_gateway(index)
        lab.start_haproxy()
        lab.wait_servers({"gw1": "UP", "gw2": "UP"})
        phases = [phase_order, phase_kill, phase_drain]
        if PG_URL:
            phases.append(phase_shared_history)
            if PG_STATE_FILE:
                phases.append(phase_postgres_outage)
            else:
                log("BC_PG_STATE_FILE is not set: the PostgreSQL outage case is not run")
        else:
            log("BC_TEST_POSTGRES_URL is not set: each instance has its own SQLite history")
        for phase in phases:
            log(f"--- {phase.__doc__.split(chr(10))[0].strip()}")
            try:
                phase(lab, results)
            except Failed as error:
                results.check(phase.__name__, False, str(error))
        stats = lab.sim_stats()
        results.check(
            "CUCM's allowance never exceeded",
            stats["busy_answers"] == 0 and stats["max_concurrent_ops"] <= SIM_MAX_CONCURRENT,
            f"code 26 answers {stats['busy_answers']}, most ops at once {stats['max_concurrent_ops']} "
            f"(gate {SIM_MAX_CONCURRENT}), since the last phase's reset",
        )
    except Failed as error:
        results.check("setup", False, str(error))
    except (SystemExit, KeyboardInterrupt) as stop:
        results.check("interrupted", False, str(stop) or "interrupted")
    finally:
        failed_any = any(not ok for _, ok, _ in results.rows)
        if failed_any:
            for process in Process.every:
                print(f"\n---- last lines of {process.name} ({process.log_path})\n{process.tail()}")
        cleanup()
        ok = results.summary()
        if ok and not os.environ.get("KEEP_LOGS"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
