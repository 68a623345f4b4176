"""The `bemsmail` command: serve, migrate, check-config, init, hash-api-key, mock, demo, loadtest."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bemsmail import __version__
from bemsmail.config import Config, ConfigError, EwsConfig, GraphConfig, load_config

EXIT_CONFIG = 2
EXIT_STARTUP = 3


def _config_path(arg: str | None) -> Path | None:
    value = arg or os.environ.get("BEMSMAIL_CONFIG")
    return Path(value) if value else None


def _load(arg: str | None) -> Config:
    path = _config_path(arg)
    try:
        return load_config(path)
    except ConfigError as exc:
        where = f" in {path}" if path else ""
        print(f"bemsmail: the configuration{where} is not valid:", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _setup_logging(config: Config) -> None:
    from bemsmail.log import configure_logging

    configure_logging(config.logging.level, config.logging.format)


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # Windows
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from bemsmail.app import Node, StartupError
    from bemsmail.daemon import install_stop_handlers, sd_notify, tune_gc

    config = _load(args.config)
    _setup_logging(config)
    outcome = {"code": 0}

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_handlers(stop)
        node = Node(config, migrate_schema=args.migrate)
        try:
            await node.start()
        except (StartupError, OSError) as exc:
            print(f"bemsmail: cannot start: {exc}", file=sys.stderr)
            await node.stop()
            outcome["code"] = EXIT_STARTUP
            return
        tune_gc()
        sd_notify("READY=1")
        try:
            await stop.wait()
        finally:
            sd_notify("STOPPING=1")
            await node.stop()

    _run(main())
    return outcome["code"]


def cmd_migrate(args: argparse.Namespace) -> int:
    from bemsmail.store.engine import create_engine, safe_url
    from bemsmail.store.schema import migrate

    config = _load(args.config)
    _setup_logging(config)

    async def main() -> int:
        engine = create_engine(config.database)
        try:
            status = await migrate(engine)
        except Exception as exc:
            print(f"bemsmail: migration of {safe_url(config.database)} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return EXIT_STARTUP
        finally:
            await engine.dispose()
        print(f"database {safe_url(config.database)} is at schema {status.current}")
        return 0

    return asyncio.run(main())


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"configuration OK: {len(config.tenants)} tenant(s), {len(config.apns.apps)} APNs app(s), "
          f"{len(config.fcm.apps)} FCM app(s), database {config.database.url.split(':', 1)[0]}")
    if not args.connect:
        return 0
    from bemsmail.store.engine import create_engine, safe_url
    from bemsmail.store.schema import schema_problem, schema_status

    async def main() -> int:
        engine = create_engine(config.database)
        try:
            problem = schema_problem(await schema_status(engine))
        except Exception as exc:
            print(f"database {safe_url(config.database)}: cannot connect: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return EXIT_STARTUP
        finally:
            await engine.dispose()
        print(f"database {safe_url(config.database)}: reachable; schema: {problem or 'current'}")
        failed = bool(problem)
        for tenant in config.tenants:
            if tenant.ews is not None:
                failed |= not await _check_ews(tenant.name, tenant.ews, tenant.domains[0], args.mailbox)
            if tenant.graph is not None:
                failed |= not await _check_graph(tenant.name, tenant.graph, tenant.domains[0], args.mailbox)
        return EXIT_STARTUP if failed else 0

    return asyncio.run(main())


async def _check_ews(name: str, settings: EwsConfig, domain: str, mailbox: str | None) -> bool:
    """Autodiscover (unless a URL is set) and one impersonated GetFolder for a probe mailbox of the tenant."""
    from bemsmail.sources.ews.exchange import EWS_DISABLED, EwsCallError, ExchangeClient

    probe = mailbox or settings.probe_mailbox or f"postmaster@{domain}"
    client = ExchangeClient(settings)
    try:
        url = str(settings.url) if settings.url else None
        if url is None:
            found = (await client.discover([probe])).get(probe)
            if found is None or found.ews_url is None:
                print(f"tenant {name}: autodiscover found no EWS URL for {probe}", file=sys.stderr)
                return False
            url = found.ews_url
            print(f"tenant {name}: autodiscover: {url} (group {found.grouping or '-'})")
        unread = await client.unread_count(probe, url)
        print(f"tenant {name}: EWS reachable at {url}; {probe} has {unread} unread in the Inbox")
        return True
    except EwsCallError as exc:
        print(f"tenant {name}: EWS call for {probe} failed: {exc.code}", file=sys.stderr)
        if exc.code == EWS_DISABLED:
            print(f"tenant {name}: EWS disabled for this tenant in Exchange Online (HTTP 403): configure "
                  '[tenants.graph] and backend = "graph", or on_ews_disabled = "migrate"', file=sys.stderr)
        return False
    finally:
        await client.close()


async def _check_graph(name: str, settings: GraphConfig, domain: str, mailbox: str | None) -> bool:
    """A token, the first page of our subscriptions, and the Inbox of a probe mailbox."""
    from bemsmail.sources.graph.client import GraphCallError, GraphClient

    probe = mailbox or settings.probe_mailbox or f"postmaster@{domain}"
    client = GraphClient(settings)
    try:
        ours = 0
        async for sub in client.subscriptions():
            ours += sub.notification_url == settings.webhook_url
        print(f"tenant {name}: Graph reachable at {settings.graph_url}; {ours} subscriptions to "
              f"{settings.webhook_url}")
        unread = await client.unread_count(probe)
        print(f"tenant {name}: {probe} has {unread} unread in the Inbox")
        return True
    except GraphCallError as exc:
        hint = " (check Mail.Read application permission and admin consent)" if exc.status == 403 else ""
        print(f"tenant {name}: Graph call failed: {exc.status} {exc.code}{hint}", file=sys.stderr)
        return False
    finally:
        await client.close()


def cmd_hash_api_key(args: argparse.Namespace) -> int:
    from bemsmail.api.auth import generate_api_key, hash_api_key

    if args.generate:
        key = generate_api_key()
        print(f"key:    {key}\nsha256: {hash_api_key(key)}")
        return 0
    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else input("API key: ").strip()
    if not key:
        print("bemsmail: no key given", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_api_key(key))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from bemsmail.devconfig import write_dev_config

    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"bemsmail: {out} exists; pass --force to replace it", file=sys.stderr)
        return EXIT_CONFIG
    key = write_dev_config(out)
    print(f"wrote {out} (local development configuration; secrets under {out.parent / 'secrets'})")
    print(f"API key (stored only as a hash; kept in {out.parent / 'secrets' / 'api-key'}): {key}")
    return 0


MOCKS = {"apns": "bemsmail.mocks.apns", "ews": "bemsmail.mocks.ews", "fcm": "bemsmail.mocks.fcm",
         "graph": "bemsmail.mocks.graph"}


def cmd_mock(args: argparse.Namespace) -> int:
    """Each mock parses its own options: `bemsmail mock apns --help`."""
    import importlib

    module = importlib.import_module(MOCKS[args.provider])
    code: int = module.main(args.options)
    return code


def cmd_loadtest(args: argparse.Namespace) -> int:
    """The load test parses its own options: `bemsmail loadtest --help`."""
    from bemsmail.loadtest.run import main as loadtest

    code: int = loadtest(args.options)
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo parses its own options: `bemsmail demo --help`."""
    from bemsmail.loadtest.demo import main as demo

    code: int = demo(args.options)
    return code


# Commands that parse their own options (argparse's REMAINDER does not take a leading --option).
OWN_OPTIONS = {"demo": cmd_demo, "loadtest": cmd_loadtest}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bemsmail", description="Mail push relay for Exchange and Exchange Online.")
    parser.add_argument("--version", action="version", version=f"bemsmail {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="TOML file (default: $BEMSMAIL_CONFIG; env overrides apply)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the daemon"))
    serve.add_argument("--migrate", action="store_true", help="upgrade the database schema before serving")
    serve.set_defaults(func=cmd_serve)
    with_config(sub.add_parser("migrate", help="upgrade the database schema")).set_defaults(func=cmd_migrate)
    check = with_config(sub.add_parser("check-config", help="validate the configuration"))
    check.add_argument("--connect", action="store_true",
                       help="also connect to the database (schema) and to each EWS tenant (autodiscover, one call)")
    check.add_argument("--mailbox", help="with --connect: the mailbox to probe EWS with (default: probe_mailbox)")
    check.set_defaults(func=cmd_check_config)
    hashing = sub.add_parser("hash-api-key", help="print the SHA-256 to put in api.auth.api_keys (key on stdin)")
    hashing.add_argument("--generate", action="store_true", help="generate a new random key and print both")
    hashing.set_defaults(func=cmd_hash_api_key)
    init = sub.add_parser("init", help="write a local development configuration with fresh throwaway secrets")
    init.add_argument("--output", "-o", default="var/bemsmail.toml")
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_init)
    mock = sub.add_parser("mock", help="run a mock provider (real wire protocol) for tests and load tests",
                          add_help=False)
    mock.add_argument("provider", choices=sorted(MOCKS))
    mock.add_argument("options", nargs=argparse.REMAINDER, help="the mock's own options (see its --help)")
    mock.set_defaults(func=cmd_mock)
    for name, text in (("demo", "the whole relay on this machine: mocks, a daemon, live pushes"),
                       ("loadtest", "measure a deployment end to end through the mocks")):
        sub.add_parser(name, help=f"{text} (see bemsmail {name} --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_OPTIONS:
        return OWN_OPTIONS[argv[0]](argparse.Namespace(options=argv[1:]))
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
