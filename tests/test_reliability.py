"""Crash safety: a bank save killed with SIGKILL at a random point leaves the old bank or the new one loadable."""

import random
import signal
import subprocess
import sys
import time
import warnings

import pytest

from regrad_hf import GradientBank

SAVER = """
import sys
from regrad_hf import GradientBank
banks = [GradientBank.from_pretrained(path) for path in sys.argv[1:3]]
print("ready", flush=True)
while True:
    for bank in banks:
        bank.save_pretrained(sys.argv[3])
"""


@pytest.mark.slow
def test_save_killed_at_random_points_leaves_a_loadable_bank(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "four")
    tiny_bank.remove("quillon")
    tiny_bank.save_pretrained(tmp_path / "three")
    target = tmp_path / "target"
    GradientBank.from_pretrained(tmp_path / "four").save_pretrained(target)
    rng = random.Random(0)
    outcomes = {3: 0, 4: 0, "recovered": 0}
    for _ in range(20):
        command = [sys.executable, "-c", SAVER, str(tmp_path / "four"), str(tmp_path / "three"), str(target)]
        saver = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bank = GradientBank.from_pretrained(target)
        outcomes["recovered"] += any("restored the previous bank" in str(w.message) for w in caught)
        assert len(bank) in (3, 4)
        bank.gather(bank.ids)  # every row readable and finite
        outcomes[len(bank)] += 1
    assert outcomes[3] + outcomes[4] == 20
    print(f"SIGKILL trials: {outcomes}")
