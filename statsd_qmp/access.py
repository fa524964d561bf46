"""Who may see which VM: the per-user access policy (pure).

Owns: turning a client's kernel-recorded credentials (:class:`Peer`: ``SO_PEERCRED`` and
``SO_PEERGROUPS``, taken by the server at connect) into a :class:`Viewer`, and the one rule
every command applies through it: a client that is root or a member of the configured admin
group sees every VM; any other client sees only the VMs whose VMM runs under its own uid (the
VMM's real uid, read when the VM was adopted; a VM the daemon created is the daemon's user's).
Imports nothing of the package and no I/O (no os, no socket, no trio): the server reads the
credentials, the registry records each VM's owner, the commands filter with it.

Why the real uid of the VMM: it is the user who started the process (libvirt's session
daemon, a plain ``qemu-system-*``) and it cannot be changed later without privileges the user
would have anyway. Credentials are the ones the kernel recorded at ``connect()`` (a process
that passes its socket to another keeps its own identity on it, as with any unix socket).
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT_UID = 0

# What a client that may not use a per-VM socket is told before the connection is closed.
NOT_YOURS = "Permission denied: this VM's statistics are served to its owner and admins only"


def vm_socket_mode(socket_mode: int) -> int:
    """The mode of a per-VM socket: its owner (the VMM's user) may always connect, the group
    as ``socket_mode`` says, others never (they could not see the VM anyway)."""
    return 0o600 | (socket_mode & 0o070)


# The per-VM socket directory: everyone may reach a socket whose name it knows (its own VMs',
# from query-vms); nobody but the daemon may list which VMs exist.
VM_DIR_MODE = 0o711


@dataclass(frozen=True, slots=True)
class Peer:
    """A unix-socket client as the kernel recorded it at ``connect()``.

    ``pid``, ``uid``, ``gid`` come from ``SO_PEERCRED`` (effective ids), ``groups`` from
    ``SO_PEERGROUPS`` (supplementary groups).
    """

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Viewer:
    """What one client may see: every VM, or those whose VMM runs under ``uid``."""

    uid: int | None
    sees_all: bool

    def may_see(self, owner_uid: int) -> bool:
        """Whether a VM whose VMM runs under ``owner_uid`` is visible to this client."""
        return self.sees_all or (self.uid is not None and owner_uid == self.uid)


# In-process callers (benchmarks, tests of the commands) that stand for the daemon itself.
EVERYTHING = Viewer(uid=None, sees_all=True)
# A client whose credentials could not be read sees no VM at all.
NOTHING = Viewer(uid=None, sees_all=False)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The configured rule: ``admin_gid`` is the admin group (None: only root sees all)."""

    admin_gid: int | None = None

    def is_admin(self, peer: Peer) -> bool:
        if peer.uid == ROOT_UID:
            return True
        admin = self.admin_gid
        return admin is not None and (peer.gid == admin or admin in peer.groups)

    def viewer(self, peer: Peer | None) -> Viewer:
        """The view a client with these credentials gets (None: unknown, sees nothing)."""
        if peer is None:
            return NOTHING
        return Viewer(uid=peer.uid, sees_all=self.is_admin(peer))
