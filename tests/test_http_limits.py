"""The HTTP layer of a real `bentoml serve`, probed with raw sockets the way a hostile or broken client would:
every answer is JSON with the right status, oversized or stalled requests are cut off instead of buffered,
and a killed worker is reported by /livez and /readyz while the others keep serving."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request

import httpx
import psutil
import pytest

from tuneserve.service.edges.front import MAX_HEADER_BYTES, MAX_HEADERS
from tuneserve.service.process import running_server
from support import photo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(model):
    env = {"TUNESERVE_MODEL": model.tag, "TUNESERVE_HEADER_TIMEOUT_S": "1", "TUNESERVE_BODY_TIMEOUT_S": "1",
           "TUNESERVE_WORKERS": "2"}
    with running_server(env=env) as url:
        yield url


def _exchange(url: str, raw: bytes, wait_s: float = 0.0, read_timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send `raw`, optionally wait, read until the server closes or a whole answer arrived: (status, headers, body)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        try:
            s.sendall(raw)
        except OSError:
            pass  # the server may have answered and closed while we were still sending
        time.sleep(wait_s)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def _error(result: tuple[int, dict, bytes], status: int, *fragments: str) -> dict:
    code, headers, body = result
    assert code == status, (code, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    message = json.loads(body)["error"]
    for f in fragments:
        assert f in message, message
    return headers


def test_oversized_and_endless_headers_are_cut_off_with_431(server):
    big = b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
    assert _error(_exchange(server, big), 431, f"over {MAX_HEADER_BYTES} bytes")["connection"] == "close"
    many = b"GET /model HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(5000)) + b"\r\n"
    _error(_exchange(server, many), 431, f"more than {MAX_HEADERS} request headers")
    unfinished = b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * 1024 * 1024)  # never ends
    _error(_exchange(server, unfinished), 431)
    long_url = b"GET /model?" + b"q" * (64 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    _error(_exchange(server, long_url), 414, "request line")


def test_stalled_clients_get_408(server):
    _error(_exchange(server, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Le"), 408, "headers did not arrive within 1 s")
    _error(_exchange(server, b""), 408)  # connected, said nothing
    slow_body = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + photo("coffee.png")[:100]
    _error(_exchange(server, slow_body), 408, "body did not arrive within 1 s", "TUNESERVE_BODY_TIMEOUT_S")


def test_malformed_framing_and_routing_errors_are_json(server):
    _error(_exchange(server, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"), 400, "malformed HTTP")
    _error(_exchange(server, b"\x16\x03\x01 this is not HTTP\r\n\r\n"), 400)
    with httpx.Client(base_url=server, timeout=30) as client:
        r = client.get("/classify")
        assert r.status_code == 405 and "GET /classify" in r.json()["error"] and "POST" in r.headers["allow"]
        for method in ("GET", "POST"):
            r = client.request(method, "/no/such/path")
            assert r.status_code == 404 and r.headers["content-type"] == "application/json", r.text
            assert "/no/such/path" in r.json()["error"]
        assert client.post("/classify", content=photo("coffee.png")).status_code == 200  # still serving
        for stray in ("/a1", "/b2", "/c3"):
            assert client.get(stray).status_code == 404
        metrics = client.get("/metrics").text
        # Answered from the request line (the route table knows no such path): no metric series for any of them.
        assert not any(f'endpoint="{stray}"' in metrics for stray in ("/a1", "/b2", "/c3", "/no/such/path"))


def test_answers_given_before_the_body_arrived_reach_a_client_that_sends_connection_close(server):
    # urllib sends `Connection: close`; a server that closes with the body unread resets the connection, and
    # the client, still sending, gets "broken pipe" instead of the answer (more than half the time at 4 MB).
    too_big = os.urandom(21 * 1024 * 1024)  # over TUNESERVE_MAX_IMAGE_BYTES' 20 MiB: refused from Content-Length
    for path, body, status in (("/classify", too_big, 413), ("/no/such/path", too_big[:4_000_000], 404)):
        for _ in range(5):
            req = urllib.request.Request(server + path, data=body, method="POST", headers={"Content-Type": "image/jpeg"})
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(req, timeout=30)
            assert answer.value.code == status and "error" in json.loads(answer.value.read())
    # The connection still closes once the body is in, as the client asked.
    host, port = server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /no/such/path HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4000000\r\n\r\n")
        s.sendall(too_big[:4_000_000])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 404") and b"connection: close" in data.lower()


def test_livez_and_readyz_tell_the_truth_while_a_worker_restarts(server, model):
    # A new connection per request: a kept-alive one may belong to the worker about to be killed.
    with httpx.Client(base_url=server, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["model"] == model.tag
        assert ready["workers"] == {"alive": 2, "expected": 2, "missing_for_s": 0.0}
        arbiter = next(p for p in psutil.process_iter(["cmdline"]) if server.rsplit(":", 1)[1] in
                       " ".join(p.info["cmdline"] or []) and "_bentoml_impl.worker" not in " ".join(p.info["cmdline"] or []))
        victim = [c for c in arbiter.children() if "_bentoml_impl.worker" in " ".join(c.cmdline())][0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        seen_short, answers = False, []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live, ready = client.get("/livez"), client.get("/readyz")
            assert live.status_code == 200 and ready.status_code == 200  # the other worker answers, truthfully
            answers.append(client.post("/classify", content=photo("coffee.png")).status_code)
            workers = ready.json()["workers"]
            seen_short |= workers["alive"] == 1
            if seen_short and workers["alive"] == 2:
                break
            time.sleep(0.2)
        assert seen_short, "the killed worker was never reported missing"
        assert workers["alive"] == 2, "BentoML did not restart the worker"
        assert answers and set(answers) == {200}


def test_uvicorn_is_a_version_the_protocol_was_tested_with():
    """The HTTP protocol builds on uvicorn's private HttpToolsProtocol: the installed uvicorn is in the tested
    range, every private member it relies on is there, and another version stops the service with the reason."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from tuneserve.service.edges.front import check_uvicorn

    check_uvicorn()
    with pytest.raises(RuntimeError, match=r"uvicorn 0\.56\.0 is installed, but .* tested with uvicorn >=0\.55,<0\.56"):
        check_uvicorn("0.56.0")
    for member in ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_message_complete",
                   "on_response_complete", "data_received", "connection_made", "connection_lost",
                   "send_400_response", "_unset_keepalive_if_required", "_should_upgrade", "handle_websocket_upgrade"):
        assert callable(getattr(HttpToolsProtocol, member, None)), member
