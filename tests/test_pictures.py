"""The pictures a run leaves (a grid where a run stops mid-epoch, samples/progress.gif over every finished epoch) and
the curves plot.py draws from a run's events."""
import subprocess
import sys
from pathlib import Path

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SMALL_VANILLA, SMALL_WGAN, run_hooked, run_script

ROOT = Path(__file__).resolve().parents[1]


def image_steps(run):
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    return [e.step for e in acc.Images("fake")]


def gif_frames(path):
    with Image.open(path) as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        return gif.n_frames, gif.size, durations


def test_a_run_stopped_by_max_steps_leaves_the_grid_of_that_step(tmp_path, data_root):
    out = run_script("train_wgan.py", "--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "r",
                     "--max-steps", "13", "--no-eval", *SMALL_WGAN)  # 8 steps per epoch: stops inside epoch 2
    assert out.returncode == 0, out.stderr
    samples = tmp_path / "r" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["epoch_001.png", "progress.gif", "step_0000013.png"]
    with Image.open(samples / "step_0000013.png") as grid:
        assert grid.size == (8 * 30 + 2, 8 * 30 + 2)  # the 64 fixed-noise samples, 28 px + 2 px padding
    assert image_steps(tmp_path / "r") == [8, 13]


def test_progress_gif_has_one_frame_per_finished_epoch_also_across_a_sigint_and_resume(tmp_path, data_root):
    run = tmp_path / "r"
    common = ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "r", "--epochs", "4", "--no-eval",
              *SMALL_VANILLA]
    out = run_hooked("train_vanilla_gan", 19, "SIGINT", *common)  # inside epoch 3
    assert out.returncode == 130, out.stderr
    assert gif_frames(run / "samples" / "progress.gif")[0] == 2
    assert (run / "samples" / "step_0000019.png").is_file()  # the grid of where it stopped
    out = run_script("train_vanilla_gan.py", "--resume", run)
    assert out.returncode == 0, out.stderr
    frames, size, durations = gif_frames(run / "samples" / "progress.gif")
    assert frames == 4 and size == (8 * 30 + 2, 4 * 30 + 2 + 14)  # 32 samples and a 14 px label band
    assert durations[-1] > durations[0]  # the last frame held longer
    assert image_steps(run) == [8, 16, 19, 24, 32]


def plot(*args):
    return subprocess.run([sys.executable, str(ROOT / "plot.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_plot_writes_the_curves_and_the_correlation_with_fid(tmp_path, data_root):
    out = run_script("train_wgan.py", "--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "r",
                     "--epochs", "4", "--eval-every", "1", *SMALL_WGAN)
    assert out.returncode == 0, out.stderr
    result = plot(tmp_path / "r")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"wrote {tmp_path / 'r' / 'curves.png'}"
    assert lines[1].startswith("Spearman rho(wasserstein_estimate, eval/fid) = ")
    assert lines[1].endswith(" over 4 epochs")
    rho = float(lines[1].split("= ")[1].split()[0])
    assert -1 <= rho <= 1
    with Image.open(tmp_path / "r" / "curves.png") as png:
        assert png.size == (800, 700)


def test_plot_of_a_run_without_eval_points_draws_curves_only(tmp_path, data_root):
    out = run_script("train_vanilla_gan.py", "--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "r",
                     "--epochs", "2", "--no-eval", *SMALL_VANILLA)
    assert out.returncode == 0, out.stderr
    result = plot(tmp_path / "r", "--out", tmp_path / "c.png")
    assert result.returncode == 0, result.stderr
    assert "no eval/fid points" in result.stdout and "--eval-every 1" in result.stdout
    assert (tmp_path / "c.png").is_file()


def test_plot_of_several_runs_draws_their_evaluations_by_epoch_and_names_each_ones_best_and_last(tmp_path, data_root):
    # 8 steps an epoch; the vanilla run stops mid-epoch 3 (--max-steps 20) and is evaluated there: epoch 2.5
    for name, script, small, stop in (("w", "train_wgan.py", SMALL_WGAN, []),
                                      ("v", "train_vanilla_gan.py", SMALL_VANILLA, ["--max-steps", "20"])):
        out = run_script(script, "--data-root", data_root, "--runs-dir", tmp_path, "--run-name", name, "--epochs",
                         "3", "--eval-every", "1", *stop, *small)
        assert out.returncode == 0, out.stderr
    result = plot(tmp_path / "w", tmp_path / "v" / "checkpoint.pt", "--out", tmp_path / "fid.png")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"wrote {tmp_path / 'fid.png'}"
    for line, name, epochs in zip(lines[1:], "wv", (["1", "2", "3"], ["1", "2", "2.5"])):
        fid = [e.value for e in EventAccumulator(str(tmp_path / name)).Reload().Scalars("eval/fid")]
        best = min(range(3), key=lambda i: fid[i])
        assert len(fid) == 3 and line == (f"{name}: eval/fid {fid[best]:.4g} at epoch {epochs[best]} (best),"
                                          f" {fid[-1]:.4g} at epoch {epochs[-1]} (last)")
    with Image.open(tmp_path / "fid.png") as png:
        assert png.size == (800, 700)
    result = plot(tmp_path / "w", tmp_path / "v")
    assert (result.returncode, result.stderr) == (2, "error: several runs make one comparison: give --out, the PNG to"
                                                     " write, e.g. --out fid.png\n")


def test_plot_of_a_folder_without_events_is_one_line(tmp_path):
    result = plot(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {tmp_path}: no TensorBoard event files there; give a run folder the"
                                     " training scripts wrote (runs/<run>)")
