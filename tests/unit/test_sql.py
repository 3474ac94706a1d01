"""SQL files: named queries, migrations, producer/subscriber table parity, DDL placeholders, quoting."""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

import pytest

from outbox_relay import sinks, sql
from outbox_relay.db import quote_ident, quote_literal
from outbox_relay.domains.reservation import handler as reservation_handler
from outbox_relay.exceptions import MigrationError
from outbox_relay.observability import sql as observability_sql

PACKAGE_DIR = Path(sql.__file__).resolve().parent
RESERVATION_DIR = PACKAGE_DIR / "domains" / "reservation"
OBSERVABILITY_DIR = PACKAGE_DIR / "observability"
#: Rooms with a query file of their own, and that file.
SINKS_DIR = PACKAGE_DIR / "sinks"
OWN_QUERY_FILES = {
    RESERVATION_DIR: reservation_handler.query,
    OBSERVABILITY_DIR: observability_sql.query,
    SINKS_DIR: sinks.query,
}

#: Functions of the package whose first argument is the name of a query in queries.sql.
QUERY_FUNCTIONS = {"query", "_ddl"}

#: The subscription DDL: takes no parameters, so identifiers are formatted in (quoted).
DDL_PLACEHOLDERS = {"subscription", "conninfo", "slot", "options"}
DDL_RE = re.compile(r"^\s*(CREATE|ALTER|DROP)\s+SUBSCRIPTION\b", re.I | re.M)


def _string_values(node: ast.expr) -> set[str]:
    """The strings an expression can evaluate to: a literal, or either branch of ``a if c else b``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _string_values(node.body) | _string_values(node.orelse)
    return set()


def used_query_names(paths: list[Path] | None = None) -> dict[str, list[str]]:
    """Every query name the core (or ``paths``) passes to query()/_ddl(), with where it is used.

    A literal argument counts directly; a variable argument counts every string
    its assignments in the same function can give (``name = "a" if x else "b"``).
    """
    found: dict[str, list[str]] = {}
    core = [p for p in PACKAGE_DIR.rglob("*.py") if not set(OWN_QUERY_FILES) & set(p.parents)]
    for path in sorted(core if paths is None else paths):
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)]
        for function in [tree, *functions]:
            assigned: dict[str, set[str]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            assigned.setdefault(target.id, set()).update(_string_values(node.value))
            for node in ast.walk(function):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                callee = node.func.id if isinstance(node.func, ast.Name) else None
                if callee not in QUERY_FUNCTIONS:
                    continue
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names = {arg.value}
                elif isinstance(arg, ast.Name) and arg.id in assigned:
                    names = assigned[arg.id]
                else:
                    continue  # a parameter (query(name) inside _ddl): its callers are counted
                for name in names:
                    found.setdefault(name, []).append(f"{path.name}:{node.lineno}")
    return found


def test_every_query_name_used_in_the_package_exists_in_queries_sql() -> None:
    """No query()/_ddl() call in the core names a query that queries.sql lacks."""
    used = used_query_names()
    assert len(used) >= 30, "the scan found too few query names: it no longer sees the calls"
    expected = {"create_subscription", "drop_subscription", "finished_columns", "fast_path"}
    assert expected <= set(used), "the scan misses conditional or DDL query names"
    missing = {name: where for name, where in used.items() if name not in sql.queries()}
    assert not missing, f"queries used but not in queries.sql: {missing}"


@pytest.mark.parametrize(
    ("room", "expected"),
    [
        (RESERVATION_DIR, {"burn_reservation", "reclaim_reservation", "fast_path_ctes"}),
        (OBSERVABILITY_DIR, {"pending_counts", "subscription_health", "slot_lag_bytes"}),
    ],
    ids=["reservation", "observability"],
)
def test_every_query_name_a_room_uses_exists_in_its_own_file(room: Path, expected: set[str]) -> None:
    """A room with its own queries.sql (a plugin, observability) names only blocks of that file."""
    used = used_query_names(sorted(room.glob("*.py")))
    assert expected <= set(used), "the scan misses query names of this room"
    own = OWN_QUERY_FILES[room].queries
    missing = {name: where for name, where in used.items() if name not in own}
    assert not missing, f"queries used but not in {room.name}/queries.sql: {missing}"


def test_every_query_name_the_sinks_use_exists_in_their_own_file() -> None:
    """The sinks' query() calls name blocks of outbox_relay/sinks/queries.sql."""
    used = used_query_names(sorted(SINKS_DIR.glob("*.py")))
    assert {"delivered_sinks", "record_deliveries"} <= set(used)
    missing = {name: where for name, where in used.items() if name not in sinks.query.queries}
    assert not missing, f"queries used but not in sinks/queries.sql: {missing}"


def test_query_names_in_queries_sql_are_unique_and_bodies_non_empty() -> None:
    """No name is declared twice in queries.sql (the second would silently replace the first)."""
    text = (PACKAGE_DIR / "queries.sql").read_text()
    declared = re.findall(r"^-- name: (\S+)\s*$", text, re.M)
    assert len(declared) == len(set(declared)), "a query name is declared twice"
    assert set(declared) == set(sql.queries())
    for name, body in sql.queries().items():
        without_comments = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--"))
        assert without_comments.strip(), f"query {name} has no SQL"


def test_query_returns_the_named_text_and_rejects_unknown_names() -> None:
    """query(name) gives that block's SQL; an unknown name is a KeyError, not some other query."""
    assert "pg_try_advisory_lock" in sql.query("try_relay_lock")
    assert "-- name:" not in sql.query("try_relay_lock")
    with pytest.raises(KeyError):
        sql.query("no_such_query")


def test_ddl_queries_use_only_the_known_placeholders() -> None:
    """The subscription DDL formats in only {subscription}, {conninfo}, {slot} and the code's own
    {options} (e.g. `, failover = true`), and formats cleanly."""
    ddl = {name: text for name, text in sql.queries().items() if DDL_RE.search(text)}
    assert {"create_subscription", "enable_subscription", "drop_subscription"} <= set(ddl)
    for name, text in ddl.items():
        fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        assert fields <= DDL_PLACEHOLDERS, f"{name} uses {fields - DDL_PLACEHOLDERS}"
        assert "subscription" in fields, f"{name} does not name the subscription"
        formatted = text.format(subscription='"s"', conninfo="'host=h'", slot="'s'", options="")
        assert "{" not in formatted
    create = sql.query("create_subscription")
    assert {f for _, f, _, _ in string.Formatter().parse(create) if f} == DDL_PLACEHOLDERS


#: Queries the worker composes from fragments before running them, and the parts they take.
COMPOSED = {
    "finish_row": {"finished_columns"},
    "finish_claimed": {"finished_columns"},
    "fast_path": {"effects", "applied", "finished_columns"},
}


def test_parameterised_queries_hold_no_format_placeholders() -> None:
    """A query run with $n parameters carries no {placeholder}, but for the composed ones' known parts."""
    for name, text in sql.queries().items():
        if DDL_RE.search(text):
            continue
        found = set(re.findall(r"\{([a-z_]+)\}", text))
        assert found == COMPOSED.get(name, set()), f"{name} holds format placeholders {found}"


def test_composed_queries_render_without_placeholders() -> None:
    """finish_row and the reservation fast path come out of render() with nothing left to fill."""
    from outbox_relay.domains.reservation import plugin
    from outbox_relay.handlers import HandlerRegistry
    from outbox_relay.worker.processor import compose_fast_path

    registry = HandlerRegistry()
    registry.add_plugin(plugin)
    statement = compose_fast_path(registry)
    assert statement is not None
    assert not re.search(r"\{[a-z_]+\}", statement)
    assert "reservation_rows" in statement
    assert "SET status = 'finished'" in statement
    assert compose_fast_path(HandlerRegistry()) is None


@pytest.mark.parametrize("target", ["service", "primary"])
def test_migrations_load_in_version_order_with_unique_versions(target: str) -> None:
    """Each target's migrations exist, come back sorted by version, numbered without duplicates."""
    found = sql.migrations(target)
    assert found, f"no {target} migrations"
    versions = [m.version for m in found]
    assert versions == sorted(versions)
    assert len(versions) == len(set(versions))
    assert versions[0] == 1
    for migration in found:
        assert migration.target == target
        assert migration.sql.strip()
        assert re.fullmatch(r"[a-z0-9_]+", migration.name)


def test_migrations_reject_duplicate_versions(tmp_path: Path) -> None:
    """Two files with one version number are a MigrationError, not a silent pick."""
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "service" / "0001_b.sql").write_text("SELECT 2;")
    with pytest.raises(MigrationError):
        sql.migration_set("service", tmp_path / "service")


def test_migrations_reject_badly_named_files(tmp_path: Path) -> None:
    """A migration file not named NNNN_name.sql is a MigrationError."""
    (tmp_path / "primary").mkdir()
    (tmp_path / "primary" / "1_init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"1_init\.sql"):
        sql.migration_set("primary", tmp_path / "primary")


# -- producer / subscriber table parity ------------------------------------------------

OUTBOX_TABLE = "outbox_relay.outbox"


def _strip_comments(text: str) -> str:
    return re.sub(r"--[^\n]*", "", text)


def _split_top_level(body: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in body:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [" ".join(p.split()) for p in parts if p.strip()]


def outbox_columns(target: str) -> dict[str, str]:
    """Column name -> normalised definition of outbox_relay.outbox after all of ``target``'s migrations.

    Table-level constraints are keyed ``constraint:<text>``.
    """
    text = _strip_comments("\n".join(m.sql for m in sql.migrations(target)))
    columns: dict[str, str] = {}
    create = re.search(rf"CREATE TABLE (?:IF NOT EXISTS )?{re.escape(OUTBOX_TABLE)}\s*\(", text, re.I)
    assert create, f"no CREATE TABLE {OUTBOX_TABLE} in the {target} migrations"
    depth, end = 1, create.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        end += 1
    for item in _split_top_level(text[create.end() : end - 1]):
        head = item.split(" ", 1)
        if head[0].upper() in {"CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN", "EXCLUDE"}:
            columns[f"constraint:{item.upper()}"] = item.upper()
        else:
            columns[head[0]] = head[1].upper()
    for added in re.finditer(
        rf"ALTER TABLE (?:ONLY )?{re.escape(OUTBOX_TABLE)}\s+"
        r"ADD (?:COLUMN )?(?:IF NOT EXISTS )?(\w+)\s+([^;]+);",
        text,
        re.I,
    ):
        columns[added[1]] = " ".join(added[2].split()).upper()
    return columns


def _constraints(definition: str) -> dict[str, object]:
    default = re.search(r"\bDEFAULT\s+('[^']*'|\S+)", definition)
    return {
        "type": definition.split(" ", 1)[0],
        "not_null": "NOT NULL" in definition or "PRIMARY KEY" in definition,
        "default": default[1] if default else None,
        "identity": "GENERATED" in definition,
        "unique": "UNIQUE" in definition or "PRIMARY KEY" in definition,
        "check": "CHECK" in definition,
    }


def test_producer_and_subscriber_outbox_declare_the_same_producer_columns() -> None:
    """Every producer column exists on the subscriber with the same type, NOT NULL, default and keys."""
    primary = outbox_columns("primary")
    service = outbox_columns("service")
    producer = {name for name in primary if not name.startswith("constraint:")}
    assert producer == {"id", "correlation_id", "kind", "outcome", "payload", "created_at"}
    assert producer <= set(service), f"subscriber lacks {producer - set(service)}"
    for name in sorted(producer):
        assert _constraints(service[name]) == _constraints(primary[name]), (
            f"column {name} differs: primary {primary[name]!r}, service {service[name]!r}"
        )
        assert service[name] == primary[name], f"column {name}: {primary[name]!r} vs {service[name]!r}"


def test_contract_defaults_of_producer_columns() -> None:
    """kind defaults to 'reservation', payload to '{}', created_at to now(), id is an identity."""
    for target in ("primary", "service"):
        columns = {k: _constraints(v) for k, v in outbox_columns(target).items()}
        assert columns["kind"]["default"] == "'RESERVATION'"
        assert columns["payload"]["default"] == "'{}'"
        assert columns["created_at"]["default"] == "NOW()"
        assert columns["id"]["identity"]
        assert columns["correlation_id"]["unique"]
        assert not columns["outcome"]["not_null"], "outcome is judged by the worker, not the table"
        assert not columns["outcome"]["check"]


def test_subscriber_only_columns_accept_a_replicated_row() -> None:
    """Each tracking column is nullable or has a default: a replicated row (producer columns only) fits."""
    primary = outbox_columns("primary")
    service = outbox_columns("service")
    extra = {k: v for k, v in service.items() if k not in primary and not k.startswith("constraint:")}
    assert {"status", "attempts", "last_error", "queued_at", "finished_at"} <= set(extra)
    for name, definition in extra.items():
        info = _constraints(definition)
        assert not info["not_null"] or info["default"] is not None, f"{name} would refuse a replicated row"
        assert not info["unique"], f"{name} is unique: replicated rows would collide"
    assert _constraints(service["status"])["default"] == "'NEW'"


def test_subscriber_has_no_table_level_constraint_the_primary_lacks() -> None:
    """No extra table-level constraint on the subscriber could refuse a row the primary accepted."""
    primary = {k for k in outbox_columns("primary") if k.startswith("constraint:")}
    service = {k for k in outbox_columns("service") if k.startswith("constraint:")}
    assert service <= primary


def test_publication_publishes_inserts_only() -> None:
    """The primary's publication replicates inserts only, so no UPDATE overwrites tracking columns."""
    text = _strip_comments("\n".join(m.sql for m in sql.migrations("primary")))
    publication = re.search(r"CREATE PUBLICATION outbox_relay FOR TABLE (\S+) WITH \(([^)]*)\)", text)
    assert publication
    assert publication[1] == OUTBOX_TABLE
    assert re.sub(r"\s", "", publication[2]) == "publish='insert'"


# -- quoting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("outbox_relay_svc", '"outbox_relay_svc"'), ('we"ird', '"we""ird"'), ('""', '""""""')],
)
def test_quote_ident_doubles_double_quotes(name: str, expected: str) -> None:
    """quote_ident wraps in double quotes and doubles any inside."""
    assert quote_ident(name) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("host=h dbname=d", "'host=h dbname=d'"),
        ("password=it's", "'password=it''s'"),
        ("'; DROP TABLE x; --", "'''; DROP TABLE x; --'"),
    ],
)
def test_quote_literal_doubles_single_quotes(value: str, expected: str) -> None:
    """quote_literal wraps in single quotes and doubles any inside, so a value cannot end the literal."""
    quoted = quote_literal(value)
    assert quoted == expected
    inner = quoted[1:-1]
    assert "'" not in inner.replace("''", "")
