"""statsd-qmp: KVM binary statistics of every VM on a host, served over QMP.

The map: every module, its rank, what it owns and which modules of the package it may import.
An import goes only to a module of lower rank named on the importer's ``imports:`` line (``-``:
none); the package root (constants only) may be imported by any module. A ``pure`` module
imports no I/O, event loop or logging (no trio, os, structlog, socket, subprocess, fcntl,
select). ``tests/test_layering.py`` reads this map and checks every import against it: a new
module needs its entry here. ::

    10 cli
        argparse -> settings -> the daemon, or a client subcommand
        imports: adoption, app, client, config, errors, holdlib, install_check, logconfig,
                 metricsmap, registry, schema, server, sources.owned, top, tuning
    9 app
        composition root: start-up order, signals, reload, watchdog, shutdown
        imports: access, adoption, commands, config, discovery, errors, exporter, fdbudget,
                 logconfig, loopstats, memtrim, metrics_http, registry, render, schema, sd_daemon,
                 server, socketfiles, sources.kvm_abi, sources.owned, tuning
    8 metrics_http
        the HTTP/1.1 metrics endpoint on trio and h11: formats, gzip, limits
        imports: errors, exporter, loopstats, metricsmap, steps
    7 exporter
        a scrape of every VM in steps; the self-metrics
        imports: _native, loopstats, metricsmap, metricsrender, registry, steps, vm
    7 server
        trio listeners (host socket, one per VM), one Connection per client, limits
        imports: access, commands, errors, loopstats, outbox, peers, protocol, registry,
                 replymemory, socketfiles, steps, vm
    6 commands (pure)
        QMP command table, QEMU's argument rules and texts, stats filters
        imports: access, errors, hash_order, hmp, introspection, qjson.writer, render, schema,
                 steps, vm
    6 discovery
        host VMMs -> registry changes: scans, borrowing, exit watches, names, when to adopt
        imports: adoption, errors, fdbudget, registry, sources.borrowed, statsfile, steps, vm
    6 metricsrender
        one VM's samples: one bulk pread, one C render with marks
        imports: _native, engine, errors, metricsmap, render, vm
    5 registry
        the live set of served VMs: names, socket paths, add/drop, rescans
        imports: errors, schema, sources.owned, statsfile, vm
    5 render
        query-stats JSON rendered in C from the bulk read buffer
        imports: _native, engine, qjson.writer, schema, vm
    4 protocol (pure)
        sans-IO QMP connection: bytes -> requests, replies -> bytes
        imports: errors, hash_order, qjson.streamer, qjson.writer
    4 top
        ``statsd-qmp top``: host-socket polling, kvm_stat's scriptable modes, the log file
        imports: client, topmodel, topscreen, topterm
    4 vm
        one served VM: its stats files, cached schemas, prepared batch reads
        imports: engine, schema, statsfile
    3 adoption
        ptrace injection of KVM_GET_STATS_FD into a running VMM (policy; C mechanics in _adopt)
        imports: errors, sources.borrowed, steps
    3 engine
        many stats files read in one native call
        imports: _native, errors, statsfile
    3 qjson.streamer (pure)
        JSON input framing into messages, limits, recovery after errors
        imports: qjson.fastpath, qjson.lexer, qjson.parser, qjson.unicode
    3 sources.owned
        the daemon's own VMs on /dev/kvm: creation, vCPU threads, teardown
        imports: errors, sources.guest, sources.kvm_abi
    3 topterm
        top's terminal: curses, keys, prompts, the refresh loop
        imports: topmodel, topscreen
    2 config
        the TOML configuration file: keys, types, ranges, one error per bad file
        imports: errors, logconfig, metricsmap, schema
    2 holdlib
        the stats-fd hold library's path, its LD_PRELOAD, exec of a VMM
        imports: errors, install_check
    2 qjson.fastpath (pure)
        the stdlib scanner where its result provably equals QEMU's parser
        imports: qjson.parser
    2 qjson.writer (pure)
        values -> QEMU's compact JSON text
        imports: hash_order, qjson.parser, qjson.unicode
    2 sources.borrowed
        /proc scan for VMMs' stats fds, pidfd_getfd, QEMU's -name
        imports: _native, fdbudget, steps
    2 sources.guest
        the owned VMs' guest: machine code, memory layout, initial registers
        imports: sources.kvm_abi
    2 statsfile
        one stats fd: header, id and descriptors parsed once; data located
        imports: _native, errors, schema
    2 topscreen (pure)
        top's view state and keys, the screen as styled lines
        imports: topmodel
    1 _native
        the only importer of the compiled bulk reader; errno -> errors
        imports: errors
    1 client
        a small blocking QMP client for the CLI's query subcommand
        imports: errors
    1 hmp (pure)
        human-monitor-command: HMP parsing and QEMU's text of info stats/version
        imports: errors, schema
    1 install_check
        what a user (libvirt's QEMU user) cannot reach of this install, and the fix
        imports: errors
    1 metricsmap (pure)
        KVM descriptors -> Prometheus/OpenMetrics families, names, units, bucket bounds
        imports: schema
    1 outbox
        one client's queued replies and the writer that sends them
        imports: replymemory
    1 peers
        a unix-socket client's credentials: SO_PEERCRED, SO_PEERGROUPS
        imports: access
    1 qjson.parser (pure)
        JSON tokens -> values, QEMU's parse errors
        imports: qjson.lexer, qjson.unicode
    1 socketfiles
        run dir lock, stale sockets, binding unix sockets, their mode and group
        imports: errors
    1 sources.kvm_abi
        KVM ioctl numbers, uapi structs, /dev/kvm checks
        imports: errors
    1 topmodel (pure)
        top's samples, totals, rates and their formatting by unit
        imports: -
    0 access (pure)
        who may see which VM: root, the admin group, the VMM's owner
        imports: -
    0 errors (pure)
        the exception tree; each error's QMP class
        imports: -
    0 fdbudget
        descriptors as a budget: EMFILE/ENFILE, the reserve kept, what a VM costs
        imports: -
    0 hash_order (pure)
        QEMU's QDict member order, GLib hash-table order
        imports: -
    0 introspection (pure)
        query-qmp-schema entries of the served commands
        imports: -
    0 logconfig
        structlog set-up: JSON lines or console
        imports: -
    0 loopstats
        trio instrument: how long one task step blocks the event loop
        imports: -
    0 memtrim
        giving the heap's free memory back to the kernel after a burst of big replies
        imports: -
    0 qjson.lexer (pure)
        JSON bytes -> tokens: QEMU's lexer states
        imports: -
    0 qjson.unicode (pure)
        QEMU's modified UTF-8 rules
        imports: -
    0 replymemory
        the daemon's budget of reply bytes across connections
        imports: -
    0 schema (pure)
        KVM descriptors -> QAPI stats schemas and values
        imports: -
    0 sd_daemon
        sd_notify, watchdog interval, socket activation (stdlib only)
        imports: -
    0 steps
        long work in time slices that share the event loop
        imports: -
    0 tuning
        process-wide settings the CLI's serve applies once
        imports: -
"""

__version__ = "0.1.0"

# Where the daemon's sockets live unless --run-dir / run_dir says otherwise.
DEFAULT_RUN_DIR = "/run/statsd-qmp"

# The QEMU release whose stats schema and wire behaviour the daemon reproduces.
QEMU_VERSION = {"micro": 0, "minor": 2, "major": 7}
