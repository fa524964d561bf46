"""Where stats fds come from.

* ``borrowed``: stats fds held by a VMM, copied with pidfd_getfd.
* ``owned``: VMs the daemon creates itself on /dev/kvm (the demo VM and tests); it runs the
  guest of ``guest`` through the ioctls and structs of ``kvm_abi``.
* ``synthetic``: files in the KVM binary-stats format written by tests and benchmarks.

Sources may import ``errors``, ``schema``, ``steps`` and each other (``owned`` -> ``guest`` ->
``kvm_abi``); never trio, the server or the registry.
"""
