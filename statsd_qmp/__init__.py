"""statsd-qmp: KVM binary statistics of every VM on a host, served over QMP.

Layering (imports only go downwards; each module's docstring says what it must not import)::

    cli                      argparse, one registration per subcommand; each imports its own
                             modules lazily (exec and query never import trio)
    app                      composition root: server, discovery, signals, watchdog
    server                   trio listeners, one task per connection, limits
    registry                 live VMs: sources -> VmStats, names, lifecycle (trio)
    commands, hmp            QMP commands: argument rules, filters, HMP text (pure)
    protocol                 sans-IO QMP: bytes <-> requests/replies (pure)
    vm, engine, statsfile    parsed stats files and batched reads
    install_check            what a user (libvirt's QEMU user) cannot reach of this install
    sources.*                owned VMs, borrowed fds, synthetic files
    _native, steps           the compiled bulk pread helper; long work run in time slices
    fdbudget                 descriptor shortage (EMFILE/ENFILE), the reserve, VM fd cost
    schema, errors           KVM descriptor -> QAPI mapping; exception tree (pure)
"""

__version__ = "0.1.0"

# The QEMU release whose stats schema and wire behaviour the daemon reproduces.
QEMU_VERSION = {"micro": 0, "minor": 2, "major": 7}
