"""Where stats fds come from.

* ``owned``: VMs the daemon creates itself on /dev/kvm (the demo VM and tests).
* ``borrowed``: stats fds held by a VMM, copied with pidfd_getfd.
* ``synthetic``: files in the KVM binary-stats format written by tests and benchmarks.

Sources may import ``errors``, ``schema``, ``statsfile`` and ``_native``; never trio, the
server or the registry.
"""
