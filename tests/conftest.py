"""Shared by every test tier.

Several tests send SIGINT to the programs they start (`lab`, the nightly script, the conformance harness) and judge
what they do with it. A process started in the background by a non-interactive shell (`cmd &`, as some CI runners
launch their jobs) inherits SIGINT *ignored*, and an ignored signal stays ignored across exec: Python then installs no
KeyboardInterrupt handler and bash cannot trap it, so those tests would judge the launcher, not our code. With
SIGINT handled here, every program a test starts begins with the default action, as under a terminal or systemd.
"""
from __future__ import annotations

import signal


def pytest_configure(config):
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
