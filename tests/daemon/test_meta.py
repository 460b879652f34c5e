"""The metadata plane, host side: the store behind `vhost-pv meta` and the HTTP metadata
server (header rules, recursive listings, long polls, the one-time boot token, secrets)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_status import wait_until

from vhost_pv.control import client
from vhost_pv.control.wire import Command, MetaOp, MetaRequest
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
SECRET = "s3cr3t-value-that-must-never-be-logged"
FLAVOR = {"Metadata-Flavor": "Google"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, owner="web-1"))
    with ServerProcess([path], tmp_path / "d", extra_args=["--vm", "vm7", "--meta-http", "127.0.0.1:0"]) as s:
        yield s


def base_url(server: ServerProcess) -> str:
    address = client.status(server.control)["metadata"]["http"]
    return f"http://{address}/computeMetadata/v1/"


def get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


@pytest.mark.timeout(60)
def test_meta_commands_set_get_list_remove(server: ServerProcess) -> None:
    control = server.control
    client.meta(control, MetaOp.SET, "vm7", "instance/zone", "rack-3")
    client.meta(control, MetaOp.SET, "vm7", "attributes/role", "db")
    client.meta(control, MetaOp.SET, "vm7", "secrets/db-password", SECRET)
    assert client.meta(control, MetaOp.GET, "vm7", "instance/zone")["value"] == "rack-3"
    assert client.meta(control, MetaOp.LIST, "vm7", "")["keys"] == ["attributes/", "instance/", "secrets/",
                                                                   "volumes/"]
    volume = client.meta(control, MetaOp.GET, "vm7", "volumes/vol0")["value"]
    assert (volume["state"], volume["owner"], volume["quarantine_records"]) == ("attached", "web-1", "0")
    # Replaced whole: a reader sees one value or the other.
    client.meta(control, MetaOp.SET, "vm7", "instance/zone", "rack-4")
    assert client.meta(control, MetaOp.GET, "vm7", "instance/zone")["value"] == "rack-4"
    assert client.meta(control, MetaOp.REMOVE, "vm7", "attributes/role")["removed"]
    with pytest.raises(client.ControlError, match="no such metadata key"):
        client.meta(control, MetaOp.GET, "vm7", "attributes/role")
    # The command line, as an admin types it.
    cli = [sys.executable, "-m", "vhost_pv.cli", "meta"]
    out = subprocess.run([*cli, "get", "--control", str(control), "vm7", "instance/zone", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["value"] == "rack-4"
    # Bad input: computed keys, traversal, another VM, a lying length: errors, daemon stays.
    for key in ("volumes/vol0", "secrets/../instance", "instance/a/b", "nowhere/x", "instance/" + "k" * 150):
        with pytest.raises(client.ControlError):
            client.meta(control, MetaOp.SET, "vm7", key, "x")
    with pytest.raises(client.ControlError, match="vm7"):
        client.meta(control, MetaOp.GET, "vm8", "instance/zone")
    lying = MetaRequest.build({"op": int(MetaOp.SET), "value_len": 10, "vm": "vm7", "key": "instance/x"})
    lying += b"abc"
    with pytest.raises(client.ControlError, match="value bytes"):
        client.call(control, Command.META, lying)
    assert client.meta(control, MetaOp.GET, "vm7", "instance/zone")["value"] == "rack-4"
    assert SECRET not in server.log()


@pytest.mark.timeout(60)
def test_http_header_rules_listing_and_secrets(server: ServerProcess) -> None:
    control, url = server.control, base_url(server)
    client.meta(control, MetaOp.SET, "vm7", "instance/zone", "rack-3")
    client.meta(control, MetaOp.SET, "vm7", "secrets/db-password", SECRET)

    assert get(url + "instance/zone")[0] == 403  # no Metadata-Flavor
    assert get(url + "instance/zone", {**FLAVOR, "X-Forwarded-For": "10.0.0.1"})[0] == 403
    status, body, headers = get(url + "instance/zone", FLAVOR)
    assert (status, body, headers["Metadata-Flavor"]) == (200, "rack-3", "Google")
    assert get("http://" + url.split("/")[2] + "/other", FLAVOR)[0] == 404
    assert get(url + "instance/nothing", FLAVOR)[0] == 404
    assert get(url + "instance/%2e%2e/secrets/db-password", FLAVOR)[0] in (400, 404)
    assert get(url + "instance/" + "k" * 300, FLAVOR)[0] == 400

    status, body, _ = get(url, FLAVOR)
    assert status == 200 and body.split() == ["attributes/", "instance/", "volumes/"]  # no secrets
    status, body, _ = get(url + "?recursive=true", FLAVOR)
    tree = json.loads(body)
    assert "secrets" not in tree and tree["instance"] == {"zone": "rack-3"}
    assert tree["volumes"]["vol0"]["state"] == "attached"

    # Secrets: only with the boot token, which the first request of a boot gets.
    assert get(url + "secrets/db-password", FLAVOR)[0] == 403
    status, token, _ = get(url + "instance/boot-token", FLAVOR)
    assert status == 200 and len(token) >= 32
    assert get(url + "instance/boot-token", FLAVOR)[0] == 403  # a second request is refused ...
    alerts = [a for a in client.alerts(control) if a["kind"] == "boot-token-refetch"]
    assert alerts and alerts[0]["severity"] == "critical"  # ... and alerted
    assert get(url + "secrets/db-password", {**FLAVOR, "X-Metadata-Token": "wrong"})[0] == 403
    status, body, _ = get(url + "secrets/db-password", {**FLAVOR, "X-Metadata-Token": token})
    assert (status, body) == (200, SECRET)
    # A new boot: a new token, and the old one no longer opens secrets.
    client.meta(control, MetaOp.BOOT, "vm7")
    assert get(url + "secrets/db-password", {**FLAVOR, "X-Metadata-Token": token})[0] == 403
    status, second, _ = get(url + "instance/boot-token", FLAVOR)
    assert status == 200 and second != token
    assert client.status(control)["metadata"]["http_refused"] >= 8
    assert SECRET not in server.log() and token not in server.log()


@pytest.mark.timeout(60)
def test_http_wait_for_change_sees_a_flip(server: ServerProcess) -> None:
    url = base_url(server) + "volumes/vol0/state"
    status, body, headers = get(url, FLAVOR)
    assert (status, body) == (200, "attached")
    answers: list[tuple[int, str, dict[str, str]]] = []
    poll = threading.Thread(target=lambda: answers.append(
        get(url + f"?wait_for_change=true&last_etag={headers['ETag']}", FLAVOR, timeout=30)))
    poll.start()
    time.sleep(0.5)
    assert not answers  # still waiting: nothing changed
    client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
    poll.join(20)
    assert answers and answers[0][:2] == (200, "dangling")
    assert answers[0][2]["ETag"] != headers["ETag"]
    reason = get(base_url(server) + "volumes/vol0/reason", FLAVOR)[1]
    assert reason == "container-deleted"
    # No change within timeout_sec: the current answer comes back.
    started = time.monotonic()
    status, body, _ = get(url + "?wait_for_change=true&timeout_sec=1", FLAVOR)
    assert (status, body) == (200, "dangling") and 0.9 < time.monotonic() - started < 10
    wait_until(lambda: client.status(server.control)["metadata"]["version"] > 0)
