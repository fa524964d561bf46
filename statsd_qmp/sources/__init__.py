"""Where stats fds come from.

* ``borrowed``: stats fds held by a VMM, copied with pidfd_getfd.
* ``owned``: VMs the daemon creates itself on /dev/kvm (the demo VM and tests); it runs the
  guest of ``guest`` through the ioctls and structs of ``kvm_abi``.

Sources may import ``errors``, ``steps`` and each other (``owned`` -> ``guest`` ->
``kvm_abi``); never trio, the server or the registry.
"""
