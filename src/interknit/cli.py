"""The ``interknit`` command. Exit status: 0 success, 1 a failed operation, 2 bad usage or a bad
config; errors go to stderr as one sentence."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from interknit import heap
from interknit.config import ConfigError, load_config
from interknit.names import parse_hostport

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:
    from rich.table import Table

DEFAULT_API = "http://127.0.0.1:7470"
JSON_HELP = "Print the API's JSON answer."
HEALTH_STYLE = {
    "passing": "green",
    "warning": "yellow",
    "critical": "red",
    "draining": "blue",
    "maintenance": "bright_black",
}


def log_options(command: F) -> F:
    """``--log-json`` and ``--log-level``, for every command that runs for a while."""
    command = click.option(
        "--log-level",
        default="info",
        show_default=True,
        type=click.Choice(["debug", "info", "warning", "error"]),
        help="Least severe log records written.",
    )(command)
    return click.option(
        "--log-json",
        is_flag=True,
        help="Log JSON lines instead of key=value (a proxy's access logs too).",
    )(command)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"interknit: {message}", err=True)
    sys.exit(code)


def api_url(value: str) -> str:
    """``--api`` as a URL: ``http://HOST:PORT`` as given, or ``HOST:PORT`` taken as http."""
    value = value.strip()
    hint = "must be the node's URL, such as http://127.0.0.1:7470"
    if "://" not in value:
        try:
            parse_hostport(value)
        except ValueError:
            raise click.BadParameter(hint, param_hint="--api") from None
        return "http://" + value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(hint, param_hint="--api")
    return value


class Api:
    """A small synchronous client for the node's HTTP API, for the CLI."""

    def __init__(
        self,
        base: str,
        token: str | None,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self._given = base
        self.token = token
        self.cacert, self.cert, self.key = cacert, cert, key
        self._ssl: ssl.SSLContext | None = None
        self._ssl_made = False

    @property
    def ssl(self) -> ssl.SSLContext | None:
        """The context for https:// nodes (--cacert, --cert, --key), built when first used;
        an unusable file is a usage error naming the option."""
        if not self._ssl_made:
            from interknit.tls.client import api_context
            from interknit.tls.files import TlsFileError

            try:
                self._ssl = api_context(self.cacert, self.cert, self.key)
            except TlsFileError as exc:
                fail(f"--{exc}", 2)
            self._ssl_made = True
        return self._ssl

    @property
    def base(self) -> str:
        """The node's URL, checked when a command first uses it (``interknit up`` does not)."""
        return api_url(self._given).rstrip("/")

    def not_a_node(self, what: str) -> NoReturn:
        fail(
            f"{self.base} {what}: is it an interknit node? "
            f"(--api or INTERKNIT_API; the default is {DEFAULT_API})"
        )

    def call(self, method: str, path: str, body: Any = None, expect: tuple[str, ...] = ()) -> Any:
        """The API's JSON answer; ``expect`` names keys a node's answer has (else the CLI is
        talking to something that is not a node, and says so in one sentence)."""
        result = self._call(method, path, body)
        if expect and not (isinstance(result, dict) and all(k in result for k in expect)):
            self.not_a_node(f"answered {method} {path} with something other than a node's answer")
        return result

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.ssl) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error")
            except (ValueError, AttributeError, OSError):
                message = None
            if not isinstance(message, str):
                # Not the API's error shape: whatever answered is not a node.
                self.not_a_node(f"answered {method} {path} with HTTP {exc.code} {exc.reason}")
            fail(f"{message} (HTTP {exc.code})")
        except urllib.error.URLError as exc:
            fail(f"cannot reach the node at {self.base}: {exc.reason}")
        except (TimeoutError, ConnectionError) as exc:
            fail(f"cannot reach the node at {self.base}: {exc}")
        except http.client.HTTPException:
            self.not_a_node("does not speak HTTP/1.1 as a node does")
        try:
            return json.loads(raw or b"null")
        except ValueError:
            self.not_a_node(f"answered {method} {path} with something that is not JSON")


pass_api = click.make_pass_decorator(Api)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--api",
    envvar="INTERKNIT_API",
    default=DEFAULT_API,
    show_default=True,
    help="The node to talk to: its URL, or HOST:PORT for http (also INTERKNIT_API).",
)
@click.option(
    "--token", envvar="INTERKNIT_TOKEN", default=None, help="Bearer token (INTERKNIT_TOKEN)."
)
@click.option(
    "--cacert",
    envvar="INTERKNIT_CACERT",
    default=None,
    help="CA certificates to trust for an https:// node (INTERKNIT_CACERT).",
)
@click.option(
    "--cert",
    envvar="INTERKNIT_CERT",
    default=None,
    help="Client certificate, for a node that asks for one (INTERKNIT_CERT).",
)
@click.option(
    "--key",
    envvar="INTERKNIT_KEY",
    default=None,
    help="The client certificate's key (INTERKNIT_KEY).",
)
@click.version_option(package_name="interknit")
@click.pass_context
def main(
    ctx: click.Context,
    api: str,
    token: str | None,
    cacert: str | None,
    cert: str | None,
    key: str | None,
) -> None:
    """interknit: service registry, health checks, load balancing and DNS in one node."""
    ctx.obj = Api(api, token, cacert, cert, key)


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="interknit.toml (defaults: every key's default).",
)
@log_options
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Proxy processes sharing each listener (SO_REUSEPORT).",
)
def up(config_path: str | None, log_json: bool, log_level: str, workers: int) -> None:
    """Run a node until SIGINT or SIGTERM; SIGHUP reloads listeners and routes, SIGUSR1
    reopens the access log files."""
    ignore_sigusr1()
    import_aiohttp_without_tls()
    from interknit.logs import setup_logging
    from interknit.node import Node, NodeStartError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    if workers > 1 and (config_path is None or not config.listeners):
        fail("--workers needs -c FILE with at least one [[listeners]] table", 2)
    setup_logging(log_level, log_json)

    def started(node: Node) -> None:
        heap.settle()
        click.echo(
            f"interknit node {config.node.name} is up (store: {config.registry.backend},"
            f" data in {config.node.data_dir})"
        )
        for part, where in node.listen.items():
            click.echo(f"  {part:<8} {where}")
        click.echo("  status   " + node.listen.get("api", "") + "/")
        click.echo("Stop with Ctrl-C (SIGINT) or SIGTERM.")

    try:
        node = Node(
            config,
            config_path=config_path,
            workers=workers,
            log_json=log_json,
            log_level=log_level,
        )
        run(node.run(started))
    except NodeStartError as exc:
        fail(str(exc), 2)


@main.command("check")
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The interknit.toml to check.",
)
def check_command(config_path: str) -> None:
    """Check a config file without starting anything: exit 0 when a node would take it, 2 with
    the key at fault when not."""
    try:
        config = load_config(config_path)
        _check_startable(config)
    except ConfigError as exc:
        fail(f"{config_path}: {exc}", 2)
    routes = sum(len(listener.routes) for listener in config.listeners)
    statics = sum(len(service.instances) for service in config.services)
    click.echo(
        f"{config_path}: ok: node {config.node.name}, registry {config.registry.backend} on"
        f" {config.registry.listen}, {len(config.listeners)} listener(s) with {routes}"
        f" route(s), {statics} static instance(s)"
    )


def _check_startable(config: Any) -> None:
    """What the config model cannot see but a start would trip on: the etcd extra, and two
    parts given the same address."""
    if config.registry.backend == "etcd":
        try:
            import interknit.registry.etcd  # noqa: F401
        except ImportError:
            raise ConfigError(
                "registry.backend: \"etcd\" needs the etcd extra: pip install 'interknit[etcd]'"
            ) from None
    seen: dict[tuple[str, int], str] = {}
    parts = [("registry.listen", config.registry.listen)]
    if config.dns.enabled:
        parts.append(("dns.listen", config.dns.listen))
    parts += [(f"listeners[{i}].listen", lst.listen) for i, lst in enumerate(config.listeners)]
    for key, value in parts:
        where = parse_hostport(value, port_zero=True)
        if where[1] == 0:
            continue
        if where in seen:
            raise ConfigError(f"{key}: {value} is also {seen[where]}")
        seen[where] = key


@main.command(hidden=True)
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--node-api", required=True, help="The node whose registry to follow.")
@log_options
def worker(config_path: str, node_api: str, log_json: bool, log_level: str) -> None:
    """A proxy-only worker process (started by ``interknit up --workers N``)."""
    ignore_sigusr1()
    if not node_api.startswith("https://"):
        # Over https the worker follows its node through aiohttp's TLS.
        import_aiohttp_without_tls()
    from interknit.logs import setup_logging
    from interknit.workers import run_worker

    setup_logging(log_level, log_json)
    try:
        run(run_worker(config_path, node_api, log_json))
    except ConfigError as exc:
        fail(str(exc), 2)


@main.group(invoke_without_command=True)
@click.option("--listen", default="127.0.0.1:7480", show_default=True, help="The proxy listener.")
@click.option(
    "--api-listen",
    default="127.0.0.1:7470",
    show_default=True,
    help="The registry API and status page.",
)
@click.option(
    "--dns-listen", default="127.0.0.1:7453", show_default=True, help="The DNS server (UDP+TCP)."
)
@click.pass_context
def demo(ctx: click.Context, listen: str, api_listen: str, dns_listen: str) -> None:
    """Run a complete local system to try: a node, six backends, a proxy on :7480.

    With a subcommand, switch a running demo's backend: ``interknit demo stop search-2``.
    """
    if ctx.invoked_subcommand is not None:
        return
    from interknit.demo import instructions, run_demo
    from interknit.logs import setup_logging
    from interknit.node import NodeStartError

    # The terminal of a person trying things: what changes, good news and bad, in words, at
    # local time; not the node's routine lines.
    setup_logging("warning", human=True)
    for name in ("interknit.health", "interknit.proxy", "interknit.events"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        run_demo(api_listen, dns_listen, listen, lambda d: click.echo(instructions(d)))
    except NodeStartError as exc:
        fail(str(exc), 2)
    except ConfigError as exc:
        fail(str(exc), 2)


def _switch_backend(api: Api, backend: str, running: bool) -> None:
    result = api.call("PUT", f"/v1/demo/backends/{_q(backend)}", {"running": running})
    click.echo(f"{result['backend']} is {'running' if result['running'] else 'stopped'}")


@demo.command("stop")
@click.argument("backend")
@pass_api
def demo_stop(api: Api, backend: str) -> None:
    """Stop a demo backend (its port refuses connections)."""
    _switch_backend(api, backend, False)


@demo.command("start")
@click.argument("backend")
@pass_api
def demo_start(api: Api, backend: str) -> None:
    """Start a stopped demo backend again."""
    _switch_backend(api, backend, True)


def run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is for odd platforms
        return asyncio.run(coro)


def ignore_sigusr1() -> None:
    """SIGUSR1 (logrotate's "reopen your logs") ends a process that has no handler for it yet:
    ignored until the node or worker installs its own."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def import_aiohttp_without_tls() -> None:
    """Import aiohttp, for a node or a worker, as if Python had no ``ssl`` module.

    At import aiohttp builds two client TLS contexts and loads the system's CA bundle into each,
    about 2.5 MiB of a node's RSS. These processes never speak TLS through aiohttp: the API and
    status page are served by uvloop (over TLS too), a worker follows its node over plain HTTP
    (one whose node serves https imports aiohttp as usual), etcd is reached with gRPC. Only
    aiohttp's own import sees no ``ssl``; modules that already hold it keep it, and anything
    imported afterwards gets it as usual.
    """
    if "aiohttp" in sys.modules:
        return
    # ssl, and the modules that look for it once when imported (asyncio and urllib.request,
    # imported above, and http.client), are imported with it.
    import http.client  # noqa: F401
    import ssl

    sys.modules["ssl"] = None  # type: ignore[assignment]  # now "import ssl" raises ImportError
    try:
        import aiohttp.web
    except ImportError:  # pragma: no cover - an aiohttp that cannot do without ssl
        for name in [n for n in sys.modules if n == "aiohttp" or n.startswith("aiohttp.")]:
            del sys.modules[name]
        sys.modules["ssl"] = ssl
        import aiohttp.web  # noqa: F401
    finally:
        sys.modules["ssl"] = ssl


def _emit(data: Any, as_json: bool, table: Table | None) -> None:
    if as_json or table is None:
        click.echo(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        Console().print(table)


@main.command()
@click.argument("service")
@click.argument("instance_id", metavar="ID")
@click.option("--address", required=True, help="IP address or host name of the instance (no port).")
@click.option("--port", required=True, type=click.IntRange(1, 65535), help="Its port.")
@click.option("--ttl", default=None, help="A TTL check: renew with heartbeats (e.g. 10s).")
@click.option("--http-check", default=None, metavar="PATH", help="An HTTP check: GET PATH.")
@click.option("--tcp-check", is_flag=True, help="A TCP check: connect to the port.")
@click.option("--interval", default=None, help="Check interval (default 2s).")
@click.option("--deregister-after", default=None, help="Remove after critical this long.")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option("--zone", default=None, help="Its zone (a DNS label), for zone-aware balancing.")
@click.option("--region", default=None, help="Its region (a DNS label), for DNS GSLB.")
@click.option(
    "--weight",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Its share of traffic against the others.",
)
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
@pass_api
def register(
    api: Api,
    service: str,
    instance_id: str,
    address: str,
    port: int,
    ttl: str | None,
    http_check: str | None,
    tcp_check: bool,
    interval: str | None,
    deregister_after: str | None,
    tags: tuple[str, ...],
    zone: str | None,
    region: str | None,
    weight: int,
    meta: tuple[str, ...],
    as_json: bool,
) -> None:
    """Register (or update) an instance of SERVICE."""
    _address_option(address)
    kinds = [k for k in (ttl, http_check, tcp_check or None) if k]
    if len(kinds) > 1:
        raise click.UsageError("give at most one of --ttl, --http-check and --tcp-check")
    body: dict[str, Any] = {"address": address, "port": port, "weight": weight, "tags": list(tags)}
    if zone:
        body["zone"] = zone
    if region:
        body["region"] = region
    if meta:
        pairs = {}
        for item in meta:
            key, sep, value = item.partition("=")
            if not sep:
                raise click.UsageError(f"--meta {item!r} must be KEY=VALUE")
            pairs[key] = value
        body["meta"] = pairs
    check: dict[str, Any] = {}
    if ttl:
        check["ttl"] = ttl
    elif http_check:
        check["http"] = http_check
    elif tcp_check:
        check["tcp"] = True
    if (interval or deregister_after) and not check:
        raise click.UsageError("--interval and --deregister-after need a check")
    if interval:
        check["interval"] = interval
    if deregister_after:
        check["deregister_after"] = deregister_after
    if check:
        body["check"] = check
    path = f"/v1/services/{_q(service)}/instances/{_q(instance_id)}"
    result = api.call("PUT", path, body, expect=("health", "revision"))
    if as_json:
        _emit(result, True, None)
    else:
        click.echo(
            f"registered {service}/{instance_id} at {address}:{port}: "
            f"{result['health']} (revision {result['revision']})"
        )


@main.command()
@click.argument("service")
@click.argument("instance_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_api
def deregister(api: Api, service: str, instance_id: str, as_json: bool) -> None:
    """Remove an instance of SERVICE."""
    result = api.call(
        "DELETE", f"/v1/services/{_q(service)}/instances/{_q(instance_id)}", expect=("revision",)
    )
    if as_json:
        _emit(result, True, None)
    else:
        click.echo(f"deregistered {service}/{instance_id} (revision {result['revision']})")


@main.command()
@click.argument("service")
@click.argument("instance_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_api
def heartbeat(api: Api, service: str, instance_id: str, as_json: bool) -> None:
    """Renew the TTL of an instance."""
    result = api.call(
        "PUT",
        f"/v1/services/{_q(service)}/instances/{_q(instance_id)}/heartbeat",
        expect=("health",),
    )
    if as_json:
        _emit(result, True, None)
    else:
        click.echo(f"renewed {service}/{instance_id}: {result['health']}")


@main.command()
@click.argument("service")
@click.argument("instance_id", metavar="ID")
@click.option(
    "--maintenance", "status", flag_value="maintenance", help="Take it out of every answer instead."
)
@click.option("--undo", "status", flag_value="passing", help="Give it work again.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_api
def drain(api: Api, service: str, instance_id: str, status: str | None, as_json: bool) -> None:
    """Send an instance no new work (existing work finishes); --undo gives it work again."""
    status = status or "draining"
    path = f"/v1/services/{_q(service)}/instances/{_q(instance_id)}/health"
    result = api.call("PUT", path, {"status": status}, expect=("health",))
    if as_json:
        _emit(result, True, None)
        return
    click.echo(f"{service}/{instance_id} is now {result['health']}")
    if status != "passing":
        click.echo(f"  undo with: interknit drain {service} {instance_id} --undo")


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_api
def services(api: Api, as_json: bool) -> None:
    """List services with their instance counts."""
    result = api.call("GET", "/v1/services", expect=("revision", "services"))
    from rich.table import Table

    table = Table(
        title=f"services (revision {result['revision']})"
        + (" [red]STALE[/]" if result.get("stale") else "")
    )
    for column in ("service", "instances", "passing"):
        table.add_column(column)
    for name, info in result["services"].items():
        style = (
            "green"
            if info["passing"] == info["instances"]
            else ("red" if info["passing"] == 0 else "yellow")
        )
        table.add_row(name, str(info["instances"]), f"[{style}]{info['passing']}[/]")
    _emit(result, as_json, table)
    _stale_warning(result)


@main.command()
@click.argument("service")
@click.option("--healthy", is_flag=True, help="Only passing instances.")
@click.option("--tag", default=None, help="Only instances with this tag.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_api
def instances(api: Api, service: str, healthy: bool, tag: str | None, as_json: bool) -> None:
    """List the instances of SERVICE; exit status 1 when there are none (none passing, with
    --healthy)."""
    query = {}
    if healthy:
        query["healthy"] = "1"
    if tag:
        query["tag"] = tag
    qs = ("?" + urllib.parse.urlencode(query)) if query else ""
    result = api.call("GET", f"/v1/services/{_q(service)}{qs}", expect=("revision", "instances"))
    from rich.table import Table

    table = Table(
        title=f"{service} (revision {result['revision']})"
        + (" [red]STALE[/]" if result.get("stale") else "")
    )
    for column in ("id", "address", "health", "zone", "weight", "tags"):
        table.add_column(column)
    for inst in result["instances"]:
        style = HEALTH_STYLE.get(inst["health"], "white")
        table.add_row(
            inst["id"],
            f"{inst['address']}:{inst['port']}",
            f"[{style}]{inst['health']}[/]",
            inst.get("zone") or "-",
            str(inst["weight"]),
            ",".join(inst["tags"]),
        )
    if result["instances"] or as_json:
        _emit(result, as_json, table)
    _stale_warning(result)
    if not result["instances"]:
        which = " with tag " + tag if tag else ""
        if healthy:
            fail(f"{service} has no passing instance{which}")
        fail(f"{service} has no instance{which}")


def _stale_warning(result: dict[str, Any]) -> None:
    """Stale answers are served (the node's last copy) but said so; a node that has never
    reached its store has no copy at all, which is a failure."""
    if not result.get("stale"):
        return
    if not result.get("revision"):
        fail("the node has not reached its store yet (stale, revision 0): it knows nothing yet")
    click.echo(
        "interknit: STALE: the node cannot reach its store; this is its last known copy"
        f" (revision {result['revision']})",
        err=True,
    )


def _address_option(address: str) -> None:
    """``--address`` takes a host, not ``host:port`` (the port has its own option)."""
    host, sep, port = address.rpartition(":")
    if sep and ":" not in host and port.isdigit():
        raise click.BadParameter(
            f"{address!r} has a port: give it with --port, as --address {host} --port {port}",
            param_hint="--address",
        )


def _duration_option(name: str, value: str, minimum: float = 0.0) -> float:
    from interknit.durations import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None
    if seconds < minimum:
        raise click.BadParameter(f"must be at least {minimum:g}s", param_hint=name)
    return seconds


def _meta_pairs(items: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--meta {item!r} must be KEY=VALUE")
        pairs[key] = value
    return pairs


def _label_option(name: str, value: str) -> str:
    from interknit.registry.model import is_label

    if not is_label(value):
        raise click.BadParameter(
            "must be a DNS label: lowercase letters, digits and '-', 1 to 63 characters",
            param_hint=name,
        )
    return value


@main.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--service", required=True, help="The service the child is an instance of.")
@click.option("--id", "instance_id", default=None, help="Instance id (default HOST-PORT).")
@click.option(
    "--port",
    required=True,
    type=click.IntRange(0, 65535),
    help="The child's port, passed as PORT; 0 picks a free one.",
)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="The address callers use: an IP, or 'auto' (this host's default-route address).",
)
@click.option("--http-check", default=None, metavar="PATH", help="Ready when GET PATH is 2xx.")
@click.option("--tcp-check", is_flag=True, help="Ready when the port accepts (the default).")
@click.option("--notify", is_flag=True, help="Ready when the child sends READY=1 (sd_notify).")
@click.option("--interval", default="1s", show_default=True, help="Between checks once ready.")
@click.option("--check-timeout", default="1s", show_default=True, help="Each check's time limit.")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option(
    "--weight",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Its share of traffic against the others.",
)
@click.option("--zone", default=None, help="Its zone (a DNS label), for zone-aware balancing.")
@click.option("--region", default=None, help="Its region (a DNS label), for DNS GSLB.")
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable).")
@click.option("--ttl", default="10s", show_default=True, help="Lease, renewed every TTL/3.")
@click.option("--drain", default="5s", show_default=True, help="Draining time before SIGTERM.")
@click.option("--stop-timeout", default="10s", show_default=True, help="SIGKILL after this.")
@click.option(
    "--restart",
    type=click.Choice(["no", "on-failure"]),
    default="no",
    show_default=True,
    help="Start the child again when it fails on its own (with a doubling backoff).",
)
@log_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_api
def run_command(
    api: Api,
    service: str,
    instance_id: str | None,
    port: int,
    address: str,
    http_check: str | None,
    tcp_check: bool,
    notify: bool,
    interval: str,
    check_timeout: str,
    tags: tuple[str, ...],
    weight: int,
    zone: str | None,
    region: str | None,
    meta: tuple[str, ...],
    ttl: str,
    drain: str,
    stop_timeout: str,
    restart: str,
    log_json: bool,
    log_level: str,
    command: tuple[str, ...],
) -> None:
    """Run CMD as an instance of a service: registered once ready, drained and deregistered
    when it stops.

    \b
    interknit run --service web --port 0 -- sh -c 'exec python -m http.server "$PORT"'
    """
    import socket as socketlib

    from interknit.agent import addresses, names
    from interknit.agent.registry_api import RegistryApi
    from interknit.agent.run import RunSpec, supervise
    from interknit.agent.supervisor import Settings
    from interknit.logs import setup_logging

    _label_option("--service", service)
    if instance_id is not None:
        _label_option("--id", instance_id)
    for tag in tags:
        _label_option("--tag", tag)
    if zone is not None:
        _label_option("--zone", zone)
    if region is not None:
        _label_option("--region", region)
    if http_check and tcp_check:
        raise click.UsageError("give at most one of --http-check and --tcp-check")
    if http_check is not None and (
        not http_check.startswith("/") or len(http_check) > 1024 or not http_check.isprintable()
    ):
        raise click.BadParameter("must be a path starting with '/'", param_hint="--http-check")
    try:
        policy = addresses.check_policy(address)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--address") from None
    settings = Settings(
        ttl=_duration_option("--ttl", ttl, 0.1),
        interval=_duration_option("--interval", interval, 0.01),
        drain=_duration_option("--drain", drain),
        stop_timeout=_duration_option("--stop-timeout", stop_timeout),
        notify=notify,
        restart=restart == "on-failure",
    )
    timeout = _duration_option("--check-timeout", check_timeout, 0.01)
    pairs = _meta_pairs(meta)
    setup_logging(log_level, log_json)
    where = addresses.resolve(policy)
    if port == 0:
        # Free now; the child binds it a moment later (the usual race of picking a port).
        family = socketlib.AF_INET6 if ":" in where else socketlib.AF_INET
        with socketlib.socket(family, socketlib.SOCK_STREAM) as probe:
            try:
                probe.bind((where, 0))
            except OSError as exc:
                fail(f"cannot pick a free port on {where}: {exc.strerror or exc}")
            port = int(probe.getsockname()[1])
    hostname = socketlib.gethostname()
    spec = RunSpec(
        service=service,
        instance_id=instance_id or names.to_label(f"{names.host_label(hostname)}-{port}"),
        address=where,
        port=port,
        command=command,
        settings=settings,
        owner=f"run:{os.getpid()}@{hostname}",
        http_check=http_check,
        check_timeout=timeout,
        tags=tags,
        weight=weight,
        zone=zone,
        region=region,
        meta=pairs,
    )
    registry = RegistryApi(api.base, api.token, ssl_context=api.ssl)
    code = asyncio.run(supervise(spec, registry))
    sys.exit(code)


@main.group()
def agent() -> None:
    """Agents that register instances automatically."""


@agent.command("containers")
@click.option(
    "--socket",
    "engine_socket",
    default=None,
    help="The engine's API: a unix socket path or tcp://HOST:PORT "
    "(default DOCKER_HOST, else /var/run/docker.sock).",
)
@click.option(
    "--address",
    default="auto",
    show_default=True,
    help="This host's address, for ports published on 0.0.0.0: an IP, or 'auto'.",
)
@click.option("--internal", is_flag=True, help="Register containers' own addresses and ports.")
@click.option("--network", default=None, help="Which container network, with --internal.")
@click.option(
    "--all",
    "register_all",
    is_flag=True,
    help="Also register containers that name no service, under their image's name.",
)
@click.option("--host", default=None, help="This host's name in owners and ids (default hostname).")
@click.option(
    "--ttl",
    default="30s",
    show_default=True,
    help="Lease of registrations without a check, renewed by the agent; 0 for none.",
)
@click.option(
    "--deregister-after",
    default="1m",
    show_default=True,
    help="Remove a registration critical this long (its agent or host gone).",
)
@click.option("--resync", default="30s", show_default=True, help="Full reconciliation period.")
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics.",
)
@log_options
@pass_api
def agent_containers(
    api: Api,
    engine_socket: str | None,
    address: str,
    internal: bool,
    network: str | None,
    register_all: bool,
    host: str | None,
    ttl: str,
    deregister_after: str,
    resync: str,
    metrics_listen: str | None,
    log_json: bool,
    log_level: str,
) -> None:
    """Register the containers a Docker-compatible engine runs, and remove them when they stop.

    \b
    docker run -d -p 127.0.0.1:8080:80 --label interknit.service=web nginx
    interknit agent containers --socket /var/run/docker.sock
    """
    import socket as socketlib

    from interknit.agent import addresses, names
    from interknit.agent.containers import watch_containers
    from interknit.agent.engine import Engine, engine_address
    from interknit.agent.labels import Policy
    from interknit.agent.metrics import AgentMetrics
    from interknit.agent.registry_api import RegistryApi
    from interknit.logs import setup_logging

    try:
        where = engine_address(engine_socket)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--socket") from None
    try:
        policy_address = addresses.check_policy(address)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--address") from None
    if network is not None and not internal:
        raise click.UsageError("--network chooses a container network and needs --internal")
    lease = _duration_option("--ttl", ttl)
    if 0 < lease < 0.1:
        raise click.BadParameter("must be 0 or at least 100ms", param_hint="--ttl")
    hostname = host or socketlib.gethostname()
    setup_logging(log_level, log_json)
    policy = Policy(
        host=names.host_label(hostname),
        owner=f"agent:{hostname}",
        address=addresses.resolve(policy_address),
        internal=internal,
        network=network,
        explicit=not register_all,
        ttl=lease or None,
        deregister_after=_duration_option("--deregister-after", deregister_after),
    )
    period = _duration_option("--resync", resync, 0.1)
    metrics = AgentMetrics()
    if metrics_listen is not None:
        # ":9100" listens on loopback.
        spelled = f"127.0.0.1{metrics_listen}" if metrics_listen.startswith(":") else metrics_listen
        try:
            host, port = parse_hostport(spelled)
        except ValueError as exc:
            raise click.BadParameter(
                f"must be HOST:PORT ({exc})", param_hint="--metrics-listen"
            ) from None
        try:
            metrics.serve(host, port)
        except OSError as exc:
            fail(f"cannot listen on {metrics_listen} for metrics: {exc.strerror or exc}", 2)
    registry = RegistryApi(api.base, api.token, ssl_context=api.ssl)
    asyncio.run(watch_containers(Engine(where), registry, policy, period, metrics))


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
