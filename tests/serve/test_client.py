"""The stdlib serve client against real HTTP servers (no Ray): errors, and following a moved app."""

from __future__ import annotations

import pytest

from serve.client import ServeClient, ServeHTTPError
from serve.handle import free_port


def test_a_moved_app_is_found_again_through_resolve(json_server):
    old_url, old = json_server({"version": "1"})
    new_url, _ = json_server({"version": "2"})
    where = {"url": old_url}
    asked = []

    def resolve() -> str:
        asked.append(1)
        return where["url"]

    c = ServeClient(old_url, resolve=resolve)
    assert c.version()["version"] == "1" and not asked          # reachable: resolve is not asked
    old.shutdown()
    old.server_close()                                           # the replica restarted elsewhere
    where["url"] = new_url
    assert c.version()["version"] == "2"
    assert c.url == new_url and len(asked) == 1
    assert c.version()["version"] == "2" and len(asked) == 1     # and stays there


def test_an_unreachable_app_that_did_not_move_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    c = ServeClient(url, resolve=lambda: url)
    with pytest.raises(ServeHTTPError, match=f"cannot reach the serve app at {url}") as err:
        c.version()
    assert err.value.status == 0 and str(err.value).endswith("check that it runs (`flywheel serve`, or a campaign) "
                                                              "and that this is its URL")
    broken = ServeClient(url, resolve=lambda: 1 / 0)              # a failing resolve does not hide the cause
    with pytest.raises(ServeHTTPError, match="cannot reach"):
        broken.version()
