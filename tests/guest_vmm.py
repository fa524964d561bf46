"""A VMM for tests whose guest runs: an owned VM (the demo guest) in a process of its own.

Run as ``python -m tests.guest_vmm [--vcpus N] [--tick-hz HZ] -name QEMU-NAME``. The guest's
timer ticks ``HZ`` times a second on each vCPU (one halt wake-up per tick), so rates are known
in advance. It prints ``ready`` once the VM runs and stops on SIGTERM or SIGINT. The daemon
discovers it like any VMM and names it after ``-name``.
"""

from __future__ import annotations

import argparse
import signal

from statsd_qmp.sources.owned import OwnedVM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--tick-hz", type=float, default=50.0)
    parser.add_argument("-name", dest="qemu_name", default=None)
    args = parser.parse_args()
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # also for the vCPU threads
    vm = OwnedVM.create(args.vcpus, tick_hz=args.tick_hz)
    try:
        print("ready", flush=True)
        signal.sigwait(stop_signals)
    finally:
        vm.close()


if __name__ == "__main__":
    main()
