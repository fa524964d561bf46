"""QMP commands: the command table, QAPI-style argument rules and the stats filters.

Owns: which commands a socket serves, QEMU's argument validation order and exact error texts
(the behaviour of QEMU 7.2's ``qapi/qobject-input-visitor.c``), and the ``query-stats`` /
``query-stats-schemas`` semantics of QEMU 7.2's ``qmp_query_stats`` (checked against a live
QEMU 7.2): empty lists mean nothing, unknown names and paths are ignored, results without
stats are left out, duplicate provider requests are duplicated, every list comes out in
QEMU's (prepended, i.e. reversed) order.
Must not import trio, os or the server; the registry reaches it only through
:class:`CommandContext`.

Two kinds of socket use this table:

* a per-VM socket (``Scope(host=False, vm=...)``) answers like that VM's QEMU monitor; its
  vCPUs are ``/kvm/vcpu[N]`` with N the KVM vCPU id;
* the host socket (``Scope(host=True)``) serves every VM: ``query-vms``, ``adopt-vm``
  (only for the daemon's operator unless ``adopt_any_client``), and an optional
  ``vm`` argument on ``query-stats``, ``query-stats-schemas``, ``query-cpus-fast`` and
  ``human-monitor-command``. With ``vm`` the answer equals that VM's own socket; without it
  ``query-stats`` covers every VM and names each result ``/vm/NAME`` or ``/vm/NAME/vcpu[N]``.

Every request carries the client's :class:`access.Viewer`: "every VM" above means every VM
that client may see. A VM it may not see answers exactly as a VM that does not exist (same
error, same rescan first), and a per-VM socket refuses a client that may not see its VM.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from . import QEMU_VERSION, hmp, introspection, render
from .access import NOT_YOURS, Viewer
from .errors import CommandNotFoundError, QmpError, StatsdQmpError, StatsFileError
from .hash_order import first_unexpected_member
from .qjson.writer import dumps
from .schema import PROVIDER, HistogramOrder
from .steps import Steps, finish
from .vm import VmStats, vcpu_path, vm_path

TARGETS: Final = ("vm", "vcpu")
PROVIDERS: Final = (PROVIDER,)
CPU_TARGET: Final = "x86_64"
# A query-stats with more provider requests than this is checked and made in steps.
MANY_REQUESTS: Final = 64

Args = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RawJson:
    """A return value already serialised in QEMU's format (the lists of ``query-vms`` and
    host-wide ``query-cpus-fast``).

    Held as parts, which the server queues as they are (a big reply is never joined whole):
    they must not change until written.
    """

    parts: tuple[bytes | memoryview, ...]

    @property
    def text(self) -> bytes:
        return b"".join(self.parts)


@dataclass(frozen=True, slots=True)
class RawSteps:
    """Work to run in steps (see :mod:`steps`) whose result is the command's value: the
    checks and size bound of a ``query-stats`` with many provider requests, giving a
    :class:`PlannedReply`."""

    steps: Steps[Any]


@dataclass(frozen=True, slots=True)
class PlannedReply:
    """A ``query-stats`` return value whose size is bounded but which is not made yet.

    ``bound`` is the most bytes it can take (known from the reply's shapes, before anything
    is read or rendered; already checked against the request's limit), so the caller can
    wait for room in its memory budget before making it. ``steps`` make it and return its
    parts. ``sliced``: the caller may pause between steps; the parts are then copies, each
    VM is checked to be still served before it is read (a dropped VM's fds are closed, their
    numbers free for other files) and read afresh after a pause. Otherwise run the steps at
    once (see :func:`steps.finish`): the parts are views into the renderers' buffers, valid
    until the next render.
    """

    bound: int
    steps: Steps[tuple[bytes | memoryview, ...]]
    sliced: bool


@dataclass(frozen=True, slots=True)
class Pending:
    """A return value still to be produced by awaiting ``run()`` (work done off this module,
    such as adopting a VMM in a thread of its own); the server awaits it."""

    run: Callable[[], Awaitable[Any]]


# adopt-vm's work, given by the composition root: (pid, or None and a QEMU -name) -> report.
# (pid, QEMU -name, owner uid the process must have: None for an admin) -> the report.
Adopter = Callable[[int | None, str | None, int | None], Awaitable[Any]]


class CommandContext(Protocol):
    """What the commands need from the daemon (implemented by the registry/server)."""

    histogram_order: HistogramOrder
    package: str

    def all_vms(self) -> Sequence[VmStats]:
        """Every served VM, sorted by name."""
        ...

    def find_vm(self, name: str) -> VmStats | None: ...

    def read_failed(self, vm: VmStats, error: StatsFileError) -> None:
        """A VM's stats fd failed mid-query: the registry drops or rescans it."""
        ...


@dataclass(frozen=True, slots=True)
class Scope:
    """Which socket a request came in on, and which VMs its client may see."""

    host: bool
    viewer: Viewer
    vm: VmStats | None = None
    peer_uid: int | None = None  # SO_PEERCRED of the client, when known

    def may_see(self, vm: VmStats) -> bool:
        return self.viewer.may_see(vm.owner_uid)

    def refusal(self) -> str | None:
        """Why this client may not use this socket at all (a per-VM socket not its own)."""
        if self.vm is not None and not self.may_see(self.vm):
            return NOT_YOURS
        return None


# --- QAPI-style argument checks -------------------------------------------------------------


def _type_error(path: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{path}', expected: {expected}")


def _missing(path: str) -> QmpError:
    return QmpError(f"Parameter '{path}' is missing")


def _unexpected(path: str) -> QmpError:
    return QmpError(f"Parameter '{path}' is unexpected")


def _bad_enum(member: str, value: str) -> QmpError:
    # QEMU names the bare member for enum errors (and 'null' for list elements).
    return QmpError(f"Parameter '{member}' does not accept value '{value}'")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_leftovers(original: Args, remaining: Args, prefix: str = "") -> None:
    """Reject members nobody consumed, naming the one QEMU would name (its hash order)."""
    if not remaining:
        return
    consumed = set(original) - set(remaining)
    key = first_unexpected_member(list(original), consumed)
    if key is not None:
        raise _unexpected(_join(prefix, key))


def _enum(
    args: Args, key: str, values: Sequence[str], *, required: bool, prefix: str = ""
) -> str | None:
    value = _string(args, key, required=required, prefix=prefix)
    if value is not None and value not in values:
        raise _bad_enum(key, value)
    return value


def _string(args: Args, key: str, *, required: bool, prefix: str = "") -> str | None:
    if key not in args:
        if required:
            raise _missing(_join(prefix, key))
        return None
    value = args.pop(key)
    if not isinstance(value, str):
        raise _type_error(_join(prefix, key), "string")
    return value


def _integer(args: Args, key: str, *, prefix: str = "") -> int | None:
    if key not in args:
        return None
    value = args.pop(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(_join(prefix, key), "integer")
    return value


def _string_list(args: Args, key: str, *, prefix: str = "") -> list[str] | None:
    if key not in args:
        return None
    path = _join(prefix, key)
    value = args.pop(key)
    if not isinstance(value, list):
        raise _type_error(path, "array")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _type_error(f"{path}[{index}]", "string")
    return list(value)


def _no_arguments(args: Args) -> None:
    _check_leftovers(args, dict(args))


@dataclass(frozen=True, slots=True)
class StatsRequest:
    provider: str
    names: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class StatsFilter:
    target: str
    providers: tuple[StatsRequest, ...] | None
    vcpus: frozenset[str] | None
    vm: str | None


def requests_in_qemu_order(stats_filter: StatsFilter) -> list[StatsRequest]:
    """The provider requests as QEMU runs them: later ones first (their results prepended),
    one for every provider when none is given; ``names: []`` asks for nothing."""
    requests = stats_filter.providers
    if requests is None:
        requests = (StatsRequest(PROVIDER, None),)
    return [r for r in reversed(requests) if r.names is None or r.names]


def parse_stats_filter(arguments: Args, *, host: bool) -> StatsFilter:
    """Validate ``query-stats`` arguments in QEMU's visiting order (target, providers, vcpus)."""
    return finish(stats_filter_steps(arguments, host=host))


CHECKS_PER_STEP = 256  # provider requests checked between two pauses (~0.4 ms)
VMS_PER_STEP = 64  # VMs whose visibility or stat names are looked at between two pauses
BOUNDS_PER_STEP = 16  # VMs whose reply size is bounded between two pauses (~0.3 ms)
PART_BYTES = 256 << 10  # a reply made in steps is copied into parts of about this size


def stats_filter_steps(arguments: Args, *, host: bool) -> Steps[StatsFilter]:
    """:func:`parse_stats_filter` in steps: a request may hold 45,000 provider requests."""
    args = dict(arguments)
    target = _enum(args, "target", TARGETS, required=True)
    assert target is not None
    providers: list[StatsRequest] | None = None
    if "providers" in args:
        raw = args.pop("providers")
        if not isinstance(raw, list):
            raise _type_error("providers", "array")
        providers = []
        for index, item in enumerate(raw):
            path = f"providers[{index}]"
            if not isinstance(item, dict):
                raise _type_error(path, "object")
            request = dict(item)
            provider = _enum(request, "provider", PROVIDERS, required=True, prefix=path)
            assert provider is not None
            names = _string_list(request, "names", prefix=path)
            _check_leftovers(item, request, path)
            providers.append(
                StatsRequest(provider, frozenset(names) if names is not None else None)
            )
            if index % CHECKS_PER_STEP == CHECKS_PER_STEP - 1:
                yield None
    vcpus = _string_list(args, "vcpus") if target == "vcpu" else None
    vm = _string(args, "vm", required=False) if host else None
    _check_leftovers(arguments, args)
    return StatsFilter(
        target,
        tuple(providers) if providers is not None else None,
        frozenset(vcpus) if vcpus is not None else None,
        vm,
    )


# --- building replies ----------------------------------------------------------------------


class Commands:
    """The command table bound to one daemon context."""

    def __init__(
        self,
        context: CommandContext,
        *,
        adopter: Adopter | None = None,
        operator_uids: frozenset[int] = frozenset({0}),
        adopt_any_client: bool = False,
    ) -> None:
        self.context = context
        self.adopter = adopter
        self.operator_uids = operator_uids
        self.adopt_any_client = adopt_any_client
        # Registration order; query-commands lists them reversed, as QEMU does. None: the
        # protocol core answers it (negotiation); a Request never names it.
        self._table: dict[str, Callable[[Scope, Args], Any] | None] = {
            "qmp_capabilities": None,
            "query-version": self._query_version,
            "query-commands": self._query_commands,
            "query-qmp-schema": self._query_qmp_schema,
            "query-cpus-fast": self._query_cpus_fast,
            "query-stats": lambda scope, args: self._query_stats(scope, args, None),
            "query-stats-schemas": self._query_stats_schemas,
            "human-monitor-command": self._human_monitor_command,
            "query-vms": self._query_vms,
            "adopt-vm": self._adopt_vm,
        }
        self._host_only = frozenset({"query-vms", "adopt-vm"})

    def names(self, scope: Scope) -> list[str]:
        return [n for n in self._table if scope.host or n not in self._host_only]

    def version(self) -> dict[str, Any]:
        return {"qemu": dict(QEMU_VERSION), "package": self.context.package}

    def needs_rescan(self, scope: Scope, command: str, arguments: Args) -> bool:
        """Whether the registry should rescan before answering (query-vms, an unknown vm)."""
        if not scope.host:
            return False
        if command == "query-vms":
            return True
        name = arguments.get("vm")
        # A VM hidden from this client is looked for exactly like an unknown one.
        return isinstance(name, str) and self._find_visible(scope, name) is None

    def visible_vms(self, scope: Scope) -> list[VmStats]:
        """The served VMs this client may see, sorted by name."""
        return [vm for vm in self.context.all_vms() if scope.may_see(vm)]

    def _visible_steps(self, scope: Scope) -> Steps[list[VmStats]]:
        """:meth:`visible_vms` in steps (10,000 VMs); none but the host socket's."""
        if not scope.host:
            return []
        every = self.context.all_vms()
        if scope.viewer.sees_all:
            return list(every)
        visible: list[VmStats] = []
        for index, vm in enumerate(every):
            if scope.may_see(vm):
                visible.append(vm)
            if index % VMS_PER_STEP == VMS_PER_STEP - 1:
                yield None
        return visible

    def _find_visible(self, scope: Scope, name: str) -> VmStats | None:
        vm = self.context.find_vm(name)
        return vm if vm is not None and scope.may_see(vm) else None

    def execute(
        self,
        scope: Scope,
        command: str,
        arguments: Args,
        *,
        oob: bool,
        max_reply_bytes: int | None = None,
    ) -> Any:
        """Run a command; raises :class:`QmpError` with QEMU's class and text on failure.

        ``max_reply_bytes`` bounds a ``query-stats`` reply, checked before it is made (a
        limit QEMU lacks: its reply to 45,000 repeated provider requests is 248 MB). The
        value is plain data, a :class:`RawJson`, a :class:`PlannedReply` or
        :class:`RawSteps` giving one.
        """
        handler = self._table.get(command)
        if handler is None or (command in self._host_only and not scope.host):
            raise CommandNotFoundError(f"The command {command} has not been found")
        if oob:
            # No command served here is marked allow-oob (QEMU allows only a few).
            raise QmpError(f"The command {command} does not support OOB")
        refusal = scope.refusal()
        if refusal is not None:
            # The server refuses such a client at connect; this holds when the policy changed
            # since (a reload that took the client out of the admin group).
            raise QmpError(refusal)
        if command == "query-stats":
            return self._query_stats(scope, arguments, max_reply_bytes)
        return handler(scope, arguments)

    # --- generic commands ----------------------------------------------------------------

    def _query_version(self, scope: Scope, args: Args) -> Any:
        _no_arguments(args)
        return self.version()

    def _query_commands(self, scope: Scope, args: Args) -> Any:
        _no_arguments(args)
        return [{"name": n} for n in reversed(self.names(scope))]

    def _query_qmp_schema(self, scope: Scope, args: Args) -> Any:
        _no_arguments(args)
        return introspection.schema(host=scope.host, commands=self.names(scope))

    def _scoped_vm(self, scope: Scope, args: Args) -> tuple[VmStats | None, bool]:
        """The VM a request addresses (taking ``vm`` from ``args`` on the host socket) and
        whether results use host-socket paths."""
        if not scope.host:
            return scope.vm, False
        return self._named_vm(scope, _string(args, "vm", required=False))

    def _named_vm(self, scope: Scope, name: str | None) -> tuple[VmStats | None, bool]:
        """Host socket: the VM ``name`` asks for (answered as its own socket would), or every
        VM with host-socket paths when no name is given. A VM the client may not see is
        not found, in the very words of an unknown one."""
        if name is None:
            return None, True
        vm = self._find_visible(scope, name)
        if vm is None:
            raise QmpError(f"VM '{name}' not found (query-vms lists the VMs served)")
        return vm, False

    def _vms_for(self, scope: Scope, vm: VmStats | None) -> Sequence[VmStats]:
        if vm is not None:
            return [vm]
        return self.visible_vms(scope) if scope.host else []

    def _query_cpus_fast(self, scope: Scope, arguments: Args) -> Any:
        args = dict(arguments)
        vm, host_paths = self._scoped_vm(scope, args)
        _check_leftovers(arguments, args)
        if vm is None and scope.host:
            # Every VM's vCPUs: 20,000 entries at 10,000 VMs, written in steps.
            return RawSteps(self._listed(scope, self._vcpu_entries))
        return [] if vm is None else self._vcpu_entries(vm, host_paths=host_paths)

    @staticmethod
    def _vcpu_entries(vm: VmStats, *, host_paths: bool = True) -> list[dict[str, Any]]:
        return [
            {
                "thread-id": vcpu.thread_id,
                "qom-path": vcpu_path(vm, vcpu.vcpu_id, host=host_paths),
                "cpu-index": index,
                "target": CPU_TARGET,
            }
            for index, vcpu in enumerate(vm.vcpus)
        ]

    def _query_vms(self, scope: Scope, args: Args) -> Any:
        _no_arguments(args)
        return RawSteps(self._listed(scope, self._vm_entry))

    @staticmethod
    def _vm_entry(vm: VmStats) -> list[dict[str, Any]]:
        return [
            {
                "name": vm.name,
                "pid": vm.pid,
                "vcpus": len(vm.vcpus),
                "vm-stats": vm.has_vm_stats,
                "origin": vm.origin,
                "socket": vm.socket_path,
            }
        ]

    def _listed(
        self, scope: Scope, entries: Callable[[VmStats], list[dict[str, Any]]]
    ) -> Steps[RawJson]:
        """A list of ``entries`` of every VM the client may see (``query-vms``, host-wide
        ``query-cpus-fast``), as text, one VM per step: 10,000 VMs took ~100 ms in one piece.

        The same text as the writer makes of the whole list (elements joined by ``, ``). A VM
        dropped while others ran between two steps is left out, as if gone before.
        """
        parts: list[bytes | memoryview] = [b"["]
        for vm in self.context.all_vms():
            if scope.may_see(vm) and self.context.find_vm(vm.name) is vm:
                for entry in entries(vm):
                    if len(parts) > 1:
                        parts.append(b", ")
                    parts.append(dumps(entry).encode("ascii"))
            yield None
        parts.append(b"]")
        return RawJson(tuple(parts))

    def _adopt_vm(self, scope: Scope, arguments: Args) -> Any:
        """Make a running VMM open its stats fds (ptrace injection; see ``adoption``)."""
        args = dict(arguments)
        pid = _integer(args, "pid")
        name = _string(args, "name", required=False)
        _check_leftovers(arguments, args)
        if (pid is None) == (name is None):
            raise QmpError("Exactly one of 'pid' and 'name' is required")
        if not self.adopt_any_client and scope.peer_uid not in self.operator_uids:
            uids = " or ".join(str(uid) for uid in sorted(self.operator_uids))
            raise QmpError(
                f"adopt-vm is allowed only to the daemon's operator (uid {uids}); the "
                "configuration key adopt_any_client = true allows every client"
            )
        adopter = self.adopter
        if adopter is None:
            raise QmpError("adopt-vm needs discovery of the host's VMs, which is off")
        # Like seeing, adopting: a client that is not an admin may adopt only its own VMMs.
        viewer = scope.viewer
        owner_uid = None if viewer.sees_all else viewer.uid
        if not viewer.sees_all and owner_uid is None:
            raise QmpError("adopt-vm: the client's credentials are unknown")

        async def run() -> Any:
            try:
                return await adopter(pid, name, owner_uid)
            except StatsdQmpError as exc:  # AdoptionError: refused or failed
                raise QmpError(str(exc)) from exc

        return Pending(run)

    # --- stats ---------------------------------------------------------------------------

    def _query_stats(self, scope: Scope, args: Args, max_reply_bytes: int | None) -> Any:
        providers = args.get("providers")
        plan = self._plan_stats(scope, args, max_reply_bytes)
        # Planning visits every VM of a host-wide reply (names, size bounds: ~20 us per VM
        # the first time, 59 ms at 3,000 VMs in one piece): done in steps then. A query of
        # one VM, the common case, is planned at once.
        host_wide = scope.host and args.get("vm") is None
        if host_wide or (isinstance(providers, list) and len(providers) > MANY_REQUESTS):
            return RawSteps(plan)
        return finish(plan)

    def _plan_stats(
        self, scope: Scope, args: Args, max_reply_bytes: int | None
    ) -> Steps[PlannedReply]:
        """Check the arguments, bound the reply's size (refusing it past the limit), and
        hand back the steps that make it."""
        stats_filter = yield from stats_filter_steps(args, host=scope.host)
        vm: VmStats | None
        if scope.host:
            vm, host_paths = self._named_vm(scope, stats_filter.vm)
        else:
            vm, host_paths = scope.vm, False
        vms = [vm] if vm is not None else (yield from self._visible_steps(scope))
        requests = yield from self._shaped_requests(vms, stats_filter)
        bound = yield from self._reply_bound(vms, stats_filter, requests, host_paths)
        if max_reply_bytes is not None and bound > max_reply_bytes:
            raise QmpError(
                f"The reply would exceed the limit of {max_reply_bytes} bytes per reply; "
                "ask for fewer results"
            )
        # Every VM of the host, or a request repeated many times: produced in steps, so
        # that a host with thousands of vCPUs (~1 us each) never holds the event loop for
        # the whole reply.
        sliced = (scope.host and stats_filter.vm is None and len(vms) > 1) or len(
            requests
        ) > MANY_REQUESTS
        fragments = self._fragments(scope, vms, stats_filter, requests, host_paths, sliced=sliced)
        return PlannedReply(bound, fragments, sliced)

    def _shaped_requests(
        self, vms: Sequence[VmStats], stats_filter: StatsFilter
    ) -> Steps[list[frozenset[str] | None]]:
        """:func:`requests_in_qemu_order`, each request's names cut down to names some VM
        has (the rest are ignored anyway: many spellings of one filter make one reply
        shape); requests left asking for nothing are dropped (their results are empty)."""
        if stats_filter.providers is None:
            return [None]
        known: set[str] | None = None  # made when a request first names stats
        shaped: list[frozenset[str] | None] = []
        cut: dict[frozenset[str], frozenset[str]] = {}
        for index, request in enumerate(reversed(stats_filter.providers)):
            asked = names = request.names
            if asked is not None:
                names = cut.get(asked)
                if names is None:
                    if known is None:
                        known = yield from self._known_names(vms, stats_filter.target)
                    names = cut[asked] = asked & known
                if not names:
                    continue
            shaped.append(names)
            if index % CHECKS_PER_STEP == CHECKS_PER_STEP - 1:
                yield None
        return shaped

    @staticmethod
    def _known_names(vms: Sequence[VmStats], target: str) -> Steps[set[str]]:
        """Every stat name some VM serves for ``target``."""
        known: set[str] = set()
        for index, vm in enumerate(vms):
            known |= render.stat_names(vm, target)
            if index % VMS_PER_STEP == VMS_PER_STEP - 1:
                yield None
        return known

    def _reply_bound(
        self,
        vms: Sequence[VmStats],
        stats_filter: StatsFilter,
        requests: list[frozenset[str] | None],
        host_paths: bool,
    ) -> Steps[int]:
        """The most bytes the reply's list can take, from the shapes alone."""
        repeats: dict[frozenset[str] | None, int] = {}
        for index, names in enumerate(requests):
            repeats[names] = repeats.get(names, 0) + 1
            if index % CHECKS_PER_STEP == CHECKS_PER_STEP - 1:
                yield None
        bound = 2  # "[" "]"
        for names, count in repeats.items():
            shape = self._shape(stats_filter, names, host_paths)
            per_request = 0
            for index, vm in enumerate(vms):
                per_request += render.shape_bound(vm, shape) + 2  # + ", "
                # A VM's first bound walks its descriptors (~20 us); later ones are cached.
                if index % BOUNDS_PER_STEP == BOUNDS_PER_STEP - 1:
                    yield None
            bound += per_request * count
            yield None
        return bound

    def _shape(
        self, stats_filter: StatsFilter, names: frozenset[str] | None, host_paths: bool
    ) -> render.Shape:
        return render.Shape(
            stats_filter.target,
            names,
            stats_filter.vcpus,
            host_paths,
            self.context.histogram_order,
        )

    def query_stats_json(
        self,
        scope: Scope,
        vms: Sequence[VmStats],
        stats_filter: StatsFilter,
        host_paths: bool,
    ) -> bytes:
        """:meth:`query_stats` as JSON text rendered in C; the same bytes, far faster."""
        return b"".join(self.query_stats_parts(scope, vms, stats_filter, host_paths))

    def query_stats_parts(
        self,
        scope: Scope,
        vms: Sequence[VmStats],
        stats_filter: StatsFilter,
        host_paths: bool,
    ) -> tuple[bytes | memoryview, ...]:
        """The pieces of :meth:`query_stats_json`, not yet joined (no copy of the big text)."""
        requests = finish(self._shaped_requests(vms, stats_filter))
        return finish(self._fragments(scope, vms, stats_filter, requests, host_paths, sliced=False))

    def _fragments(
        self,
        scope: Scope,
        vms: Sequence[VmStats],
        stats_filter: StatsFilter,
        requests: list[frozenset[str] | None],
        host_paths: bool,
        *,
        sliced: bool,
    ) -> Steps[tuple[bytes | memoryview, ...]]:
        """The reply's parts, in steps of one VM (see :class:`PlannedReply`).

        ``sliced``: the caller may pause between steps: parts are copies (the texts copied
        into blocks of about :data:`PART_BYTES`, one copy, each block a part the writer
        sends as it is), and VMs are read again after a pause. Otherwise parts are views
        into the renderers' buffers, valid until the next render. Either way a VM no longer
        served is never read.
        """
        target = stats_filter.target
        # VmStats and Program hash by identity: a view replaced meanwhile is another key.
        rendered: dict[render.Program, bytes | memoryview] = {}
        read: set[VmStats] = set()
        failed: set[VmStats] = set()
        parts: list[bytes | memoryview] = [b"["]
        block = bytearray(b"[")  # sliced: the part being filled
        empty = True
        for names in requests:
            shape = self._shape(stats_filter, names, host_paths)
            for vm in vms:
                if vm in failed:
                    continue
                program = render.program_for(vm, shape)
                if program is None:
                    continue
                if vm not in read:
                    if self.context.find_vm(vm.name) is not vm:
                        # Dropped or replaced since the request was planned (its planning
                        # or the wait for reply memory let others run): as if gone before.
                        failed.add(vm)
                        continue
                    try:
                        if target == "vm":
                            vm.read_vm()
                        else:
                            vm.read_vcpus()
                    except StatsFileError as error:
                        self.context.read_failed(vm, error)
                        if not scope.host or stats_filter.vm is not None:
                            raise QmpError(f"KVM stats: {error}") from error
                        failed.add(vm)
                        continue
                    read.add(vm)
                # A shape repeated by duplicate requests renders the same text from the
                # same snapshot: reuse it (a second render would overwrite the first).
                text = rendered.get(program)
                if text is None:
                    text = rendered[program] = program.render()
                if sliced:
                    if not empty:
                        block += b", "
                    block += text
                    if len(block) >= PART_BYTES:
                        parts.append(memoryview(block))
                        block = bytearray()
                else:
                    if not empty:
                        parts.append(b", ")
                    parts.append(text)
                empty = False
                if (yield None):
                    read.clear()  # the caller let others run: buffers may hold newer data
                    rendered.clear()
        if sliced:
            block += b"]"
            return (*parts[1:], memoryview(block))
        parts.append(b"]")
        return tuple(parts)

    def query_stats(
        self,
        scope: Scope,
        vms: Sequence[VmStats],
        stats_filter: StatsFilter,
        host_paths: bool,
    ) -> list[dict[str, Any]]:
        """QEMU's query-stats over ``vms``: one pass per provider request, later ones first."""
        order = self.context.histogram_order
        results: list[dict[str, Any]] = []
        per_vm_words: dict[tuple[VmStats, str], Any] = {}
        for request in requests_in_qemu_order(stats_filter):
            for vm in vms:
                try:
                    self._append_results(
                        results, vm, request, stats_filter, host_paths, order, per_vm_words
                    )
                except StatsFileError as error:
                    self.context.read_failed(vm, error)
                    if not scope.host or stats_filter.vm is not None:
                        raise QmpError(f"KVM stats: {error}") from error
                    # Host-wide query: the vanished VM is dropped, the others still answer.
        return results

    def _append_results(
        self,
        results: list[dict[str, Any]],
        vm: VmStats,
        request: StatsRequest,
        stats_filter: StatsFilter,
        host_paths: bool,
        order: HistogramOrder,
        cache: dict[tuple[VmStats, str], Any],
    ) -> None:
        names = request.names
        if stats_filter.target == "vm":
            if vm.vm_file is None:
                return
            key = (vm, "vm")
            if key not in cache:
                cache[key] = vm.read_vm()
            stats = vm.vm_file.stats(cache[key], order, names)
            if stats:
                result: dict[str, Any] = {"provider": PROVIDER, "stats": stats}
                if host_paths:
                    result["qom-path"] = vm_path(vm)
                results.append(result)
            return
        wanted = stats_filter.vcpus
        chosen = [
            (index, vcpu)
            for index, vcpu in enumerate(vm.vcpus)
            if wanted is None or vcpu_path(vm, vcpu.vcpu_id, host=host_paths) in wanted
        ]
        if not chosen:
            return
        key = (vm, "vcpus")
        if key not in cache:
            cache[key] = vm.read_vcpus()
        blocks = cache[key]
        for index, vcpu in reversed(chosen):
            stats = vcpu.file.stats(blocks[index], order, names)
            if stats:
                results.append(
                    {
                        "provider": PROVIDER,
                        "stats": stats,
                        "qom-path": vcpu_path(vm, vcpu.vcpu_id, host=host_paths),
                    }
                )

    def _query_stats_schemas(self, scope: Scope, arguments: Args) -> Any:
        args = dict(arguments)
        _enum(args, "provider", PROVIDERS, required=False)
        vm, _ = self._scoped_vm(scope, args)
        _check_leftovers(arguments, args)
        if vm is not None or not scope.host:
            return self.stats_schemas(self._vms_for(scope, vm))
        # Host-wide: the first VMs seen have both schemas; the other thousands are not visited.
        return self.stats_schemas(each for each in self.context.all_vms() if scope.may_see(each))

    @staticmethod
    def stats_schemas(vms: Iterable[VmStats]) -> list[dict[str, Any]]:
        """``[{kvm, vcpu}, {kvm, vm}]`` as QEMU orders them; an entry only if some VM has it.

        Schemas depend on the kernel only, so across VMs the first VM having each is used.
        """
        vcpu_schema: list[dict[str, Any]] | None = None
        vm_schema: list[dict[str, Any]] | None = None
        for vm in vms:
            if vcpu_schema is None and vm.vcpus:
                vcpu_schema = vm.vcpu_schema
            if vm_schema is None and vm.vm_file is not None:
                vm_schema = vm.vm_schema
            if vcpu_schema is not None and vm_schema is not None:
                break
        out: list[dict[str, Any]] = []
        if vcpu_schema is not None:
            out.append({"provider": PROVIDER, "stats": vcpu_schema, "target": "vcpu"})
        if vm_schema is not None:
            out.append({"provider": PROVIDER, "stats": vm_schema, "target": "vm"})
        return out

    # --- HMP -----------------------------------------------------------------------------

    def _human_monitor_command(self, scope: Scope, arguments: Args) -> Any:
        args = dict(arguments)
        command_line = _string(args, "command-line", required=True)
        assert command_line is not None
        cpu_index = _integer(args, "cpu-index")
        vm, _ = self._scoped_vm(scope, args)
        _check_leftovers(arguments, args)
        current_path: str | None = None
        if vm is not None and vm.vcpus:
            index = 0 if cpu_index is None else cpu_index
            if not 0 <= index < len(vm.vcpus):
                raise QmpError("Parameter 'cpu-index' expects a CPU number")
            current_path = vcpu_path(vm, vm.vcpus[index].vcpu_id, host=False)
        elif cpu_index is not None:
            raise QmpError("Parameter 'cpu-index' expects a CPU number")
        vms: Sequence[VmStats] = [vm] if vm is not None else []

        def query_stats(arguments: Args) -> list[dict[str, Any]]:
            return self.query_stats(
                Scope(host=False, viewer=scope.viewer, vm=vm),
                vms,
                parse_stats_filter(arguments, host=False),
                False,
            )

        def query_schemas(provider: str | None) -> list[dict[str, Any]]:
            return self.stats_schemas(vms)

        return hmp.run_command_line(
            command_line,
            query_stats=query_stats,
            query_schemas=query_schemas,
            current_cpu_path=current_path,
            # QEMU prints "MAJOR.MINOR.MICRO" and the package string with nothing between.
            version_text=f"{QEMU_VERSION['major']}.{QEMU_VERSION['minor']}."
            f"{QEMU_VERSION['micro']}{self.context.package}",
        )
