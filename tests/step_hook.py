"""Run a training script with its step function wrapped, to fault the run at a chosen step (for subprocess tests).

    python tests/step_hook.py SCRIPT AT ACTION [script flags...]

SCRIPT is train_vanilla_gan or train_wgan; AT counts the steps this process makes (train_step calls for the vanilla
GAN, critic_step calls for the WGAN). ACTION is what happens at step AT:

    SIGKILL, SIGINT, SIGTERM   the process sends itself the signal right after the step
    nan                        a weight of D (or the critic) turns NaN just before the step
    pause                      the process sleeps after the step, holding its run folder, until it is killed
    full-disk-checkpoint       from this step on, every checkpoint write fails with ENOSPC after a few bytes
    full-disk-png              from this step on, every sample grid write fails with ENOSPC
    full-disk-events           from this step on, every TensorBoard event write fails with ENOSPC
    out-of-memory              the step raises the CPU allocator's out-of-memory error
    broken-evaluation          from this step on, every quality evaluation raises RuntimeError
"""
import errno
import importlib
import os
import signal
import sys
import time

import torch

import utils

STEP_FUNCTIONS = {"train_vanilla_gan": "train_step", "train_wgan": "critic_step"}


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def partial_then_full_disk(obj, f, *args, **kwargs):
    f.write(b"half a checkpoint")
    full_disk()


def out_of_memory(*args, **kwargs):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you"
                       " tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")


def broken(*args, **kwargs):
    raise RuntimeError("the evaluation broke")


def fault(action):
    if action in ("SIGKILL", "SIGINT", "SIGTERM"):
        os.kill(os.getpid(), getattr(signal, action))
    elif action == "pause":
        print("paused", flush=True)
        time.sleep(600)
    elif action == "full-disk-checkpoint":
        torch.save = partial_then_full_disk
    elif action == "full-disk-png":
        import torchvision.utils

        torchvision.utils.save_image = full_disk
    elif action == "full-disk-events":
        from tensorboard.summary.writer.record_writer import RecordWriter

        RecordWriter.write = full_disk
    elif action == "out-of-memory":
        out_of_memory()
    elif action == "broken-evaluation":
        import evaluate

        evaluate.Evaluator.__init__ = broken
    else:
        raise SystemExit(f"step_hook: unknown action {action}")


def main():
    script, at, action, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    module = importlib.import_module(script)
    step_fn_name = STEP_FUNCTIONS[script]
    real_step, count = getattr(module, step_fn_name), [0]

    def step(G, D, *args):
        count[0] += 1
        if count[0] == at and action == "nan":  # as after an exploding update
            with torch.no_grad():
                next(D.parameters()).fill_(float("nan"))
        out = real_step(G, D, *args)
        if count[0] == at and action != "nan":
            fault(action)
        return out

    setattr(module, step_fn_name, step)
    utils.run_main(module.main, flags)


if __name__ == "__main__":
    main()
