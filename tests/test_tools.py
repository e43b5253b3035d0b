"""tools/: the benchmark (the steps it times do only the work the algorithm needs) and the plot of a run."""
import json

import torch

import bench
import plot
import train_wgan
from conftest import SMALL_WGAN, run_in_process


def test_step_flops_match_a_hand_count_so_no_needless_work_is_done():
    """Matrix-multiply FLOPs of one step at the benchmark's sizes, counted by hand (multiply-adds x 2). Ours skips what
    the algorithm does not need: G's graph in the D step, D's weight gradients in the G step, gradients w.r.t. data."""
    cpu = torch.device("cpu")
    g_fwd = 32 * (64 * 256 + 256 * 784)
    d_step = 64 * (784 * 128 + 128) + 64 * 128 * 784 + 64 * 128 * 2  # forward on real+fake; weight grads only
    g_step = 32 * (784 * 128 + 128) * 2 + 32 * (784 * 256) * 2 + 32 * 64 * 256  # D fwd+input grads; G grads
    batches32 = iter(lambda: torch.rand(32, 1, 28, 28) * 2 - 1, None)
    ref, ours, _, _ = bench.vanilla_setup(cpu)
    assert bench.flops_per_step(ours, batches32, n=2) == 2 * (g_fwd + d_step + g_step)
    assert bench.flops_per_step(ref, batches32, n=2) > 1.3 * 2 * (g_fwd + d_step + g_step)
    _, ours, _, _ = bench.wgan_setup(cpu)
    g_widths = 100 * 128 + 128 * 256 + 256 * 512 + 512 * 1024 + 1024 * 784
    c_widths = 784 * 512 + 512 * 256 + 256
    critic_step = 64 * g_widths + 2 * 128 * c_widths + 128 * (512 * 256 + 256)  # no grads through G or to the data
    generator_step = 2 * 64 * g_widths + 64 * (g_widths - 100 * 128) + 2 * 64 * c_widths
    batches = iter(lambda: torch.rand(64, 1, 28, 28) * 2 - 1, None)
    assert bench.flops_per_step(ours, batches, n=5) == 2 * (critic_step + generator_step / 5)


def test_bench_times_both_loops_and_reports_their_ratio(tmp_path):
    code, out, err = run_in_process(bench, ["--data-root", tmp_path, "--steps", 2, "--repeats", 1, "--warmup", 1,
                                            "--json"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["data"] == "random uint8 images" and result["matmul_gflops"] > 0
    default_batch = train_wgan.make_parser().get_default("batch_size")  # the script's, beside the sources' 64
    assert (result["wgan"]["batch"], result["wgan_default"]["batch"]) == (64, default_batch)
    for algo in ("vanilla", "wgan", "wgan_default", "wgan_gp"):
        r = result[algo]
        ours, ref = r["steps_per_s"], r["ref_steps_per_s"]  # each rounded to 0.1, the ratio of the unrounded to 0.01
        rounding = 0.005 + ours / ref * (0.05 / ours + 0.05 / ref) * 1.01
        assert ours > 0 and abs(r["ratio"] - ours / ref) <= rounding


def test_plot_draws_a_run_and_sets_its_wasserstein_estimate_against_fid(tmp_path, data_root, capsys):
    assert run_in_process(train_wgan, ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "w",
                                       "--epochs", 3, "--eval-every", 1, *SMALL_WGAN])[0] == 0
    plot.run_main([str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'w' / 'curves.png'}" in out and "Spearman rho(wasserstein_estimate, eval/fid) = " in out
    assert (tmp_path / "w" / "curves.png").stat().st_size > 1000


def test_plot_compares_runs_against_seconds_and_says_when_fid_first_fell_below_each_threshold(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    for name, fids in (("a", [120, 60, 40, 25, 18]), ("b", [90, 70, 55, 45, 44])):
        with SummaryWriter(tmp_path / name) as writer:
            for epoch, fid in enumerate(fids, 1):  # 10 steps an epoch; a 12 s epoch, then 10 s each
                writer.add_scalar("epoch_mean/loss/D", 0.5, 10 * epoch)
                writer.add_scalar("train_seconds", 2 + 10 * epoch, 10 * epoch)
                writer.add_scalar("eval/fid", fid, 10 * epoch)
    plot.run_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "f.png"), "--x", "seconds"])
    out = capsys.readouterr().out
    assert "a: eval/fid 18 at 52 s (best), 18 at 52 s (last); first below 100, 50, 30, 20: 22 s, 32 s, 42 s, 52 s" in out
    assert "b: eval/fid 44 at 52 s (best), 44 at 52 s (last); first below 100, 50, 30, 20: 12 s, 42 s, -, -" in out
    assert (tmp_path / "f.png").stat().st_size > 1000
    plot.run_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "f.png")])
    assert "first below 100, 50, 30, 20: epoch 2, epoch 3, epoch 4, epoch 5" in capsys.readouterr().out


def test_plot_gives_the_seeds_of_one_setting_one_colour_and_one_legend_entry(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    names = ["wgan-s1", "w-20261206-194115", "wgan-s2", "w-20261206-201502"]  # two seeds; two default-named runs
    for name in names:
        with SummaryWriter(tmp_path / name) as writer:
            for epoch in (1, 2):
                writer.add_scalar("epoch_mean/loss/D", 0.5, 10 * epoch)
                writer.add_scalar("eval/fid", 50 / epoch, 10 * epoch)
    figures = []
    monkeypatch.setattr(plot, "save", lambda fig, out: figures.append(fig))
    plot.run_main([str(tmp_path / name) for name in names] + ["--out", str(tmp_path / "f")])
    fid_ax = figures[0].axes[0]
    seed_1, default_1, seed_2, default_2 = (line.get_color() for line in fid_ax.get_lines())
    assert seed_1 == seed_2 and len({seed_1, default_1, default_2}) == 3
    assert fid_ax.get_legend_handles_labels()[1] == ["wgan", "w-20261206-194115", "w-20261206-201502"]
