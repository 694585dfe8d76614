"""Replicated Redis/Valkey clusters to break on purpose: kill, freeze, fail over, migrate.

`ReplicatedCluster.start(kind)` forms 3 primaries with one replica each on free ports of
127.0.0.1 (`cluster-node-timeout 1000`, so a killed primary is replaced in about 1.3-2 s),
without redis-cli: `CLUSTER ADDSLOTSRANGE`, `CLUSTER MEET` and `CLUSTER REPLICATE` through
synchronous admin clients. Faults:

- `kill(node)` (SIGKILL), `freeze(node)` / `thaw(node)` (SIGSTOP / SIGCONT);
- `failover(replica, force=..., takeover=...)` (`CLUSTER FAILOVER [FORCE|TAKEOVER]`);
- `migrate_slots(source, target, slots)`: the classic resharding steps (IMPORTING /
  MIGRATING, `GETKEYSINSLOT` + `MIGRATE ... KEYS`, `SETSLOT NODE` on every primary);
- `pause_replication(replica)`: the replica is frozen and its link dropped by the
  primary, so writes the primary acknowledges meanwhile exist on the primary only.

Every wait is a bounded poll (`wait_until`); `close()` (or leaving the `with` block)
thaws and stops every process and removes the directories.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from tests.servers.redis import Kind, _free_port, server_binary

__all__ = [
    "SCALE",
    "Call",
    "ClusterNode",
    "Findings",
    "NodeView",
    "ReplicatedCluster",
    "Workload",
    "scaled",
    "stored_run",
    "stored_runs",
    "wait_until",
]

#: `AIOIDEM_FAULT_SCALE`: ``ci`` (default, fits CI time on 2 cores) or ``full``.
SCALE = os.environ.get("AIOIDEM_FAULT_SCALE", "ci").strip().lower() or "ci"
NODE_TIMEOUT_MS = 1000
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
SLOTS = 16384
_POLL_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError)


def scaled(ci: int, full: int) -> int:
    """`ci` or `full` by `AIOIDEM_FAULT_SCALE`."""
    return full if SCALE == "full" else ci


def wait_until(check: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll `check` until it is true; a connection or server error counts as false.

    Raises `RuntimeError` naming `what` after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    last: BaseException | None = None
    while True:
        try:
            if check():
                return
        except _POLL_ERRORS as exc:
            last = exc
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(delay)  # polling interval of a bounded wait, not a synchronisation stand-in
        delay = min(delay * 2, 0.1)


@dataclasses.dataclass(frozen=True)
class NodeView:
    """One line of `CLUSTER NODES` as a node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool({"fail", "fail?", "noaddr"} & self.flags)

    def owns(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


def _parse_nodes(text: str) -> dict[str, NodeView]:
    views: dict[str, NodeView] = {}
    for line in text.strip().splitlines():
        fields = line.split()
        address = fields[1].split(",")[0].split("@")[0]
        slots: list[tuple[int, int]] = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being imported or migrated
                continue
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        views[fields[0]] = NodeView(
            node_id=fields[0],
            port=int(address.rsplit(":", 1)[1] or 0),
            flags=frozenset(fields[2].split(",")),
            primary_id=None if fields[3] == "-" else fields[3],
            slots=tuple(slots),
        )
    return views


@dataclasses.dataclass(eq=False)
class ClusterNode:
    """One server process of the cluster."""

    kind: Kind
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    node_id: str = ""
    frozen: bool = False
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def admin(self, timeout: float = 5.0) -> redis.Redis:
        """A short-lived synchronous client (text replies) for setup and assertions."""
        return redis.Redis(
            self.host, self.port, socket_timeout=timeout, decode_responses=True, protocol=2
        )

    def command(self, *args: Any, timeout: float = 5.0) -> Any:
        """Run one command on this node alone."""
        with self.admin(timeout) as client:
            return client.execute_command(*args)

    def get(self, key: str) -> str | None:
        """GET `key` on this node, a replica included (`READONLY` first)."""
        with self.admin() as client:
            client.execute_command("READONLY")
            value = client.execute_command("GET", key)
        return None if value is None else str(value)

    def info(self, section: str) -> dict[str, str]:
        """`INFO section` (or `CLUSTER INFO` for ``"cluster"``) as a dict of strings."""
        text = (
            self.command("CLUSTER", "INFO")
            if section == "cluster"
            else self.command("INFO", section, timeout=5.0)
        )
        if isinstance(text, dict):  # redis-py parsed INFO already
            return {str(k): str(v) for k, v in text.items()}
        pairs = (line.split(":", 1) for line in str(text).splitlines() if ":" in line)
        return {name.strip(): value.strip() for name, value in pairs}

    def replication_offsets(self) -> tuple[int, list[int]]:
        """A primary's replication offset, and the offset each replica last acknowledged
        (a replica acknowledges once a second, or at once for `WAIT`)."""
        with self.admin() as client:
            info = client.info("replication")
        acked = [
            int(value["offset"])
            for name, value in info.items()
            if name.startswith("slave") and isinstance(value, dict)
        ]
        return int(info["master_repl_offset"]), acked

    def view(self) -> dict[str, NodeView]:
        """The cluster as this node sees it (`CLUSTER NODES`)."""
        return _parse_nodes(str(self.command("CLUSTER", "NODES")))

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def __repr__(self) -> str:
        return f"<{self.kind} node :{self.port} {self.node_id[:8]}>"


class ReplicatedCluster:
    """A cluster of `primaries` primaries with `replicas` replicas each, started at once."""

    def __init__(self, kind: Kind, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.nodes: list[ClusterNode] = []

    # --- life cycle ------------------------------------------------------------------------
    @classmethod
    def start(
        cls, kind: Kind, *, primaries: int = 3, replicas: int = 1, extra: Iterable[str] = ()
    ) -> ReplicatedCluster:
        """Start and form the cluster; the caller must `close()` it (or use `with`)."""
        cluster = cls(kind, Path(tempfile.mkdtemp(prefix=f"aioidem-{kind}-cluster-")))
        try:
            cluster._form(primaries, replicas, tuple(extra))
        except BaseException:
            cluster.close()
            raise
        return cluster

    def __enter__(self) -> ReplicatedCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self, extra: tuple[str, ...]) -> ClusterNode:
        binary = server_binary(self.kind)
        last_log = ""
        for _attempt in range(3):
            port = _free_port(cluster=True)
            directory = Path(tempfile.mkdtemp(prefix=f"node-{port}-", dir=self.root))
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", str(directory), "--protected-mode", "no"]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
            # A replica may be promoted however old its data (the loss scenarios need it),
            # and replicas stay where they were put.
            args += ["--cluster-replica-validity-factor", "0"]
            args += ["--cluster-allow-replica-migration", "no"]
            args += ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
            args += ["--shutdown-on-sigterm", "nosave", *extra]
            with open(directory / "server.log", "wb") as log:
                process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            node = ClusterNode(self.kind, port, directory, process)
            self.nodes.append(node)

            def ready(node: ClusterNode = node) -> bool:
                if not node.alive:
                    raise EOFError
                return bool(node.command("PING"))

            try:
                wait_until(ready, f"{self.kind} node on port {port}")
            except EOFError:
                last_log = node.log()
                self.nodes.remove(node)
                continue
            node.node_id = str(node.command("CLUSTER", "MYID"))
            return node
        raise RuntimeError(f"{self.kind}-server did not start:\n{last_log}")

    def _form(self, primaries: int, replicas: int, extra: tuple[str, ...]) -> None:
        total = primaries * (1 + replicas)
        nodes = [self._spawn(extra) for _ in range(total)]
        for epoch, node in enumerate(nodes, start=1):
            node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        bounds = [SLOTS * i // primaries for i in range(primaries + 1)]
        for index in range(primaries):
            nodes[index].command("CLUSTER", "ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1)
        for node in nodes[1:]:
            node.command("CLUSTER", "MEET", nodes[0].host, nodes[0].port)
        wait_until(
            lambda: all(len(node.view()) == total for node in nodes), f"{total} nodes to meet"
        )
        for index, replica in enumerate(nodes[primaries:]):
            primary = nodes[index % primaries]

            def replicate(replica: ClusterNode = replica, primary: ClusterNode = primary) -> bool:
                return bool(replica.command("CLUSTER", "REPLICATE", primary.node_id))

            wait_until(replicate, f"{replica} to replicate {primary}")
        self.wait_stable()

    def close(self) -> None:
        """Thaw and stop every node (SIGTERM, then SIGKILL), then remove the directories."""
        for node in self.nodes:
            if node.frozen and node.alive:
                self.thaw(node)
            if node.alive:
                node.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for node in self.nodes:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.root, ignore_errors=True)

    # --- topology --------------------------------------------------------------------------
    @property
    def live_nodes(self) -> list[ClusterNode]:
        """Nodes that run and are not frozen."""
        return [node for node in self.nodes if node.alive and not node.frozen]

    def node(self, node_id: str) -> ClusterNode:
        """The node with this id."""
        return next(node for node in self.nodes if node.node_id == node_id)

    def view(self) -> dict[str, NodeView]:
        """The cluster as the first live node sees it."""
        return self.live_nodes[0].view()

    def primaries(self) -> list[ClusterNode]:
        """Primaries that own slots and are not failed, as a live node sees them."""
        views = self.view()
        return [
            self.node(v.node_id)
            for v in views.values()
            if v.is_primary and v.slots and not v.failed
        ]

    def replicas(self) -> list[ClusterNode]:
        """Replicas (failed or not) as a live node sees them."""
        return [self.node(v.node_id) for v in self.view().values() if not v.is_primary]

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        """A replica of `primary`."""
        views = self.view()
        for view in views.values():
            if view.primary_id == primary.node_id:
                return self.node(view.node_id)
        raise LookupError(f"{primary} has no replica")

    def primary_of(self, replica: ClusterNode) -> ClusterNode:
        """The primary `replica` replicates."""
        primary_id = self.view()[replica.node_id].primary_id
        if primary_id is None:
            raise LookupError(f"{replica} is a primary")
        return self.node(primary_id)

    @staticmethod
    def slot(key: str) -> int:
        """The hash slot of `key`."""
        return int(key_slot(key.encode()))

    def primary_for(self, key: str) -> ClusterNode:
        """The live primary serving `key`'s slot."""
        slot = self.slot(key)
        for view in self.view().values():
            if view.is_primary and not view.failed and view.owns(slot):
                return self.node(view.node_id)
        raise LookupError(f"no live primary serves slot {slot}")

    def slot_ranges(self, primary: ClusterNode) -> tuple[tuple[int, int], ...]:
        """The slot ranges `primary` serves."""
        return self.view()[primary.node_id].slots

    def is_stable(self) -> bool:
        """Every live node says `cluster_state:ok`, knows the same slot owners, and every
        primary has a live replica whose link is up."""
        live = self.live_nodes
        if not all(node.info("cluster").get("cluster_state") == "ok" for node in live):
            return False
        owners = [
            sorted((v.node_id, v.slots) for v in node.view().values() if v.is_primary and v.slots)
            for node in live
        ]
        if any(owner != owners[0] for owner in owners):
            return False
        for primary_id, _ in owners[0]:
            primary = self.node(primary_id)
            if not primary.alive or primary.frozen:
                return False
        for node in live:
            info = node.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def wait_stable(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until `is_stable()`."""
        wait_until(self.is_stable, f"{self.kind} cluster to be stable", timeout)

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every live node says `cluster_state:ok` (replicas may still be down)."""

        def ok() -> bool:
            live = self.live_nodes
            return all(node.info("cluster").get("cluster_state") == "ok" for node in live)

        wait_until(ok, f"{self.kind} cluster_state:ok", timeout)

    def wait_primary(self, node: ClusterNode, timeout: float = START_TIMEOUT) -> None:
        """Wait until every live node sees `node` as a primary with slots, and the state is ok."""

        def promoted() -> bool:
            for other in self.live_nodes:
                view = other.view().get(node.node_id)
                if view is None or not view.is_primary or not view.slots or view.failed:
                    return False
                if other.info("cluster").get("cluster_state") != "ok":
                    return False
            return True

        wait_until(promoted, f"{node} to be a primary everywhere", timeout)

    # --- faults ----------------------------------------------------------------------------
    def kill(self, node: ClusterNode) -> None:
        """SIGKILL `node` and reap it."""
        if node.alive:
            node.process.kill()
            node.process.wait(timeout=STOP_TIMEOUT)
        node.frozen = False

    def freeze(self, node: ClusterNode) -> None:
        """SIGSTOP `node`: it keeps its sockets but answers nothing."""
        os.kill(node.process.pid, signal.SIGSTOP)
        node.frozen = True

    def thaw(self, node: ClusterNode) -> None:
        """SIGCONT a frozen `node`."""
        if node.alive:
            os.kill(node.process.pid, signal.SIGCONT)
        node.frozen = False

    def failover(
        self, replica: ClusterNode, *, force: bool = False, takeover: bool = False
    ) -> None:
        """`CLUSTER FAILOVER [FORCE|TAKEOVER]` on `replica`, then wait until it is the primary
        everywhere. A replica that already promoted itself is accepted as is."""
        mode = ("TAKEOVER",) if takeover else ("FORCE",) if force else ()
        try:
            replica.command("CLUSTER", "FAILOVER", *mode)
        except redis.ResponseError:
            if replica.info("replication").get("role") != "master":
                raise
        self.wait_primary(replica)

    @contextlib.contextmanager
    def pause_replication(self, replica: ClusterNode) -> Iterator[ClusterNode]:
        """Freeze `replica` and make its primary drop the link, so that what the primary
        acknowledges meanwhile is on the primary only; yields the primary. On exit the
        replica is thawed (when still alive) and catches up on its own."""
        primary = self.primary_of(replica)
        before = int(primary.info("replication").get("connected_slaves", "0"))
        self.freeze(replica)
        try:
            primary.command("CLIENT", "KILL", "TYPE", "replica")
            wait_until(
                lambda: int(primary.info("replication").get("connected_slaves", "0")) < before,
                f"{primary} to drop its replica link",
            )
            yield primary
        finally:
            if replica.frozen:
                self.thaw(replica)

    def migrate_slots(
        self,
        source: ClusterNode,
        target: ClusterNode,
        slots: Iterable[int],
        *,
        batch: int = 50,
        on_slot: Callable[[int, str], None] | None = None,
        tell_others: bool = True,
    ) -> int:
        """Move `slots` from `source` to `target` with live traffic allowed; returns the
        number of keys moved.

        Per slot: IMPORTING on the target, MIGRATING on the source, the keys moved in
        batches with `MIGRATE ... KEYS`, then `SETSLOT NODE` on the target, the source
        and every other primary. `on_slot(slot, phase)` runs while the slot is
        half-moved: ``"migrating"`` (keys still on the source) and ``"moved"`` (keys on
        the target, ownership not yet switched), so a test can put traffic into each
        window before the migration goes on. With ``tell_others=False`` only the source
        and the target are told the new owner; the other primaries learn it from the
        target's gossip (its `SETSLOT NODE` bumps its config epoch), so a primary that
        is frozen or failing over meanwhile does not stop the migration.
        """
        moved = 0
        with source.admin() as src, target.admin() as dst:
            others = [node for node in self.primaries() if node not in (source, target)]
            for slot in slots:
                dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
                if on_slot is not None:
                    on_slot(slot, "migrating")
                for _round in range(10_000):
                    keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                    if not keys:
                        break
                    src.execute_command(
                        "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys
                    )
                    moved += len(keys)
                else:  # pragma: no cover - a slot that never empties is a failure
                    raise RuntimeError(f"slot {slot} never emptied")
                if on_slot is not None:
                    on_slot(slot, "moved")
                dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
                for other in others if tell_others else ():
                    other.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        return moved


# --- workloads: engine calls whose executions are counted on another server ----------------
@dataclasses.dataclass(eq=False)
class Call:
    """One engine call: what it returned or raised, and the run it executed (if any)."""

    label: str
    lane: int
    started: float
    result: Any = None
    error: Exception | None = None
    ran: str | None = None
    ended: float = 0.0


@dataclasses.dataclass
class Findings:
    """What a workload's history shows, key by key."""

    calls: int = 0
    executions: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    causes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    foreign_errors: list[str] = dataclasses.field(default_factory=list)
    double_runs: list[str] = dataclasses.field(default_factory=list)
    excused_reruns: list[str] = dataclasses.field(default_factory=list)
    split_results: list[str] = dataclasses.field(default_factory=list)
    returned_not_stored: list[str] = dataclasses.field(default_factory=list)
    claim_lost_but_stored: list[str] = dataclasses.field(default_factory=list)
    cause_cycles: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (
            f"calls={self.calls} executions={self.executions} "
            f"double_runs={len(self.double_runs)} excused_reruns={len(self.excused_reruns)} "
            f"split_results={len(self.split_results)} "
            f"returned_not_stored={len(self.returned_not_stored)} "
            f"claim_lost_but_stored={len(self.claim_lost_but_stored)} "
            f"foreign_errors={len(self.foreign_errors)} cause_cycles={len(self.cause_cycles)} "
            f"errors={dict(self.errors)} "
            f"causes={dict(self.causes)}"
        )


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its `__cause__`s, stopping before an exception seen already (a cycle)."""
    chain = [exc]
    while chain[-1].__cause__ is not None and all(
        chain[-1].__cause__ is not seen for seen in chain
    ):
        chain.append(chain[-1].__cause__)
    return chain


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


class Workload:
    """Engine calls on labelled payloads; every run of the function is counted with
    `HINCRBY` on a standalone counter server (so a failover or a migration of the
    cluster under test cannot lose a count), and returns ``{"label", "run"}``."""

    def __init__(self, counter: Any, name: str) -> None:
        self.counter = counter  # a redis.asyncio.Redis on the counter server
        self.hash = f"runs:{name}"
        self.calls: list[Call] = []

    @staticmethod
    def payload(label: str) -> dict[str, str]:
        return {"label": label}

    async def call(self, engine: Any, label: str, lane: int) -> Call:
        """Run `label` through `engine`; never raises (the outcome is recorded)."""
        call = Call(label, lane, time.monotonic())
        self.calls.append(call)
        run = f"{label}/{len(self.calls)}"

        async def fn() -> dict[str, str]:
            await self.counter.hincrby(self.hash, label, 1)
            call.ran = run
            return {"label": label, "run": run}

        try:
            call.result = await engine.run(self.payload(label), fn)
        except Exception as exc:
            call.error = exc
        call.ended = time.monotonic()
        return call

    async def executions(self) -> dict[str, int]:
        """Runs per label, as counted on the counter server."""
        raw = await self.counter.hgetall(self.hash)
        return {_text(k): int(v) for k, v in raw.items()}

    async def findings(self, stored: dict[str, str | None]) -> Findings:
        """Judge the history; `stored` maps each label to the run id in its final record.

        - a *double run*: a label executed more than once where an earlier run was not
          released after a failed completion (`IdempotencyCompletionError`, result not
          handed to anyone, not stored); such released runs are *excused reruns*;
        - *split results*: callers (or the final record) saw two different runs;
        - *returned not stored*: a caller got a run's result but no record holds it;
        - *claim lost but stored*: `IdempotencyClaimLostError` for the very run that
          the final record holds.
        """
        from aioidempotency.exceptions import (
            IdempotencyClaimLostError,
            IdempotencyCompletionError,
            IdempotencyError,
        )

        findings = Findings(calls=len(self.calls))
        counted = await self.executions()
        by_label: dict[str, list[Call]] = collections.defaultdict(list)
        for call in self.calls:
            by_label[call.label].append(call)
            if call.error is None:
                continue
            findings.errors[_error_name(call.error)] += 1
            chain = _cause_chain(call.error)
            # The client's error: the end of the chain, or (when the chain is broken)
            # the exception carried as a detail.
            root: object = chain[-1] if len(chain) > 1 else None
            if root is None:
                root = next((a for a in call.error.args if isinstance(a, BaseException)), None)
            if isinstance(root, BaseException):
                findings.causes[f"{_error_name(call.error)}<-{_error_name(root)}"] += 1
            if chain[-1].__cause__ is not None:
                findings.cause_cycles.append(f"{call.label}: {[repr(e) for e in chain]}")
            if not isinstance(call.error, IdempotencyError):
                findings.foreign_errors.append(f"{call.label}: {call.error!r}")
        for label, calls in by_label.items():
            runs = [call for call in calls if call.ran is not None]
            assert counted.get(label, 0) == len(runs), (label, counted.get(label), len(runs))
            findings.executions += len(runs)
            returned = {call.result["run"] for call in calls if call.error is None}
            record = stored.get(label)

            def released(call: Call, returned: set[str] = returned, record: Any = record) -> bool:
                return (
                    isinstance(call.error, IdempotencyCompletionError)
                    and call.ran not in returned
                    and call.ran != record
                )

            kept = [call for call in runs if not released(call)]
            if len(kept) > 1:
                findings.double_runs.append(f"{label}: {[(c.ran, repr(c.error)) for c in runs]}")
            elif len(runs) > 1:
                findings.excused_reruns.append(label)
            if len(returned | ({record} if record else set())) > 1:
                findings.split_results.append(f"{label}: returned {returned}, stored {record}")
            if returned and record is None:
                findings.returned_not_stored.append(f"{label}: returned {returned}")
            for call in calls:
                error = call.error
                if (
                    isinstance(error, IdempotencyClaimLostError)
                    and isinstance(error.result, dict)
                    and error.result.get("run") == record
                ):
                    findings.claim_lost_but_stored.append(f"{label}: {record}")
        return findings


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def stored_run(cluster: ReplicatedCluster, key: str) -> str | None:
    """The run id in the COMPLETED record under `key`, read straight from its primary."""
    return _run_of(cluster.primary_for(key).command("GET", key))


def stored_runs(cluster: ReplicatedCluster, keys: Iterable[str]) -> dict[str, str | None]:
    """`stored_run` for many keys: one pipeline per primary."""
    by_primary: dict[str, list[str]] = collections.defaultdict(list)
    for key in keys:
        by_primary[cluster.primary_for(key).node_id].append(key)
    runs: dict[str, str | None] = {}
    for node_id, node_keys in by_primary.items():
        with cluster.node(node_id).admin() as client:
            pipe = client.pipeline(transaction=False)
            for key in node_keys:
                pipe.get(key)
            runs.update(zip(node_keys, map(_run_of, pipe.execute()), strict=True))
    return runs


def _run_of(raw: str | None) -> str | None:
    if raw is None:
        return None
    record = json.loads(raw)
    if record.get("status") != "COMPLETED":
        return None
    data = json.loads(record["data"])
    return str(data["run"]) if isinstance(data, dict) else None
