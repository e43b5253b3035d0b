"""Run a training script with its step function wrapped, to fault the run at a chosen step (for subprocess tests).

    python tests/step_hook.py SCRIPT AT ACTION [script flags...]

SCRIPT is train_vanilla_gan, train_wgan or train_wgan_gp; AT counts the steps this process makes (train_step
calls for the vanilla GAN, critic_step calls for the WGANs). ACTION, right after step AT: SIGKILL, SIGINT or
SIGTERM (the process sends itself the signal), or pause (it says "paused" and sleeps, holding its run folder, until
it is killed).
"""
import importlib
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402

STEP_FUNCTIONS = {"train_vanilla_gan": "train_step", "train_wgan": "critic_step", "train_wgan_gp": "critic_step"}


def main():
    script, at, action, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    module = importlib.import_module(script)
    real_step, count = getattr(module, STEP_FUNCTIONS[script]), [0]

    def step(*args):
        out = real_step(*args)
        count[0] += 1
        if count[0] == at and action == "pause":
            print("paused", flush=True)
            time.sleep(600)
        elif count[0] == at:
            os.kill(os.getpid(), getattr(signal, action))
        return out

    setattr(module, STEP_FUNCTIONS[script], step)
    utils.run_main(module.main, flags)


if __name__ == "__main__":
    main()
