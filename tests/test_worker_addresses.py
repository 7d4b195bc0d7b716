"""How the worker turns --connect values into hubs (pure, no network)."""

from __future__ import annotations

import socket

import pytest

from pothead.worker.service import client_endpoint_description, endpoint_host, expand_hub_addresses

pytestmark = pytest.mark.no_reactor


def _resolver(*addresses: tuple[int, str]):
    def resolve(host: str, port: int, type: int = 0):
        return [(family, socket.SOCK_STREAM, 6, "", (address, port) if family == socket.AF_INET else (address, port, 0, 0))
                for family, address in addresses]
    return resolve


def test_a_name_with_several_addresses_means_several_hubs() -> None:
    resolve = _resolver((socket.AF_INET, "10.0.0.1"), (socket.AF_INET, "10.0.0.2"), (socket.AF_INET6, "fd00::3"))
    assert expand_hub_addresses(("hubs.example:4040",), resolve) == ["10.0.0.1:4040", "10.0.0.2:4040", "[fd00::3]:4040"]


def test_one_address_literals_endpoints_and_loopback_names_are_kept() -> None:
    one = _resolver((socket.AF_INET, "10.0.0.1"))
    assert expand_hub_addresses(("hub.example:4040",), one) == ["hub.example:4040"]
    loopback = _resolver((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
    assert expand_hub_addresses(("localhost:4040",), loopback) == ["localhost:4040"]
    never = _resolver()
    assert expand_hub_addresses(("10.1.2.3:4040", "[::1]:4040", "tcp:host=h:port=1", "unix:path=/x"), never) == [
        "10.1.2.3:4040", "[::1]:4040", "tcp:host=h:port=1", "unix:path=/x"]


def test_unresolvable_names_are_kept_for_later() -> None:
    def fail(*args, **kwargs):
        raise socket.gaierror("no such host")

    assert expand_hub_addresses(("nowhere.invalid:4040",), fail) == ["nowhere.invalid:4040"]


def test_host_port_becomes_a_tcp_endpoint_and_back() -> None:
    assert client_endpoint_description("hub:4040") == "tcp:host=hub:port=4040"
    assert client_endpoint_description("[::1]:4040") == r"tcp:host=\:\:1:port=4040"
    assert endpoint_host(client_endpoint_description("[::1]:4040")) == "::1"
    assert endpoint_host("unix:path=/run/x") is None
