"""Refined-LLC timeline: halfway steps, tag selection, the figure and the table on synthetic runs."""

import pytest

from lib_lightning.llc_timeline import MODADD_SECTIONS, halfway_step, main, plot_refined_llc, refined_series, summary_table


def test_halfway_step_closed_forms():
    assert halfway_step(([0, 250, 500, 750], [400.0, 390.0, 100.0, 20.0])) == 500  # half of 400 → 20 is 210
    assert halfway_step(([0, 125, 250], [0.01, 0.6, 1.0])) == 125  # rising: halfway 0.505
    assert halfway_step(([0, 250, 500], [50.0, 80.0, 20.0])) == 500  # extreme is the peak at 250
    assert halfway_step(([0, 1], [3.0, 3.0])) is None and halfway_step(([0], [1.0])) is None
    assert halfway_step(([0, 250, 500, 750], [900.0, 400.0, 100.0, 20.0]), start=250) == 500  # ignores step 0


def _run(scale):
    steps = [250, 500, 750]
    return {
        "llc/mean": (steps, [400 * scale, 200 * scale, 20 * scale]),
        "llc/val/mean": (steps, [-900.0, -100.0, 30.0]),
        "llc/mlp/mean": (steps, [190.0, 90.0, 10.0]),
        "lib/hook_resid_mid/dim_rel": ([125, 250, 500, 750], [100.0, 90.0, 40.0, 30.0]),
        "edges/hook_resid_mid->hook_resid_post/lib_n99": (steps, [5000.0, 900.0, 300.0]),
        "val/acc": (steps, [0.01, 0.5, 1.0]),
        "train/loss": (steps, [0.1, 0.01, 0.001]),
    }


def test_series_figure_and_table():
    runs = [refined_series(_run(s), MODADD_SECTIONS) for s in (1.0, 1.1)]
    assert set(runs[0]) == {"llc/whole", "llc/val", "llc/mlp", "dim/mlp", "edges/mlp", "val/acc"}
    fig = plot_refined_llc(runs)
    assert len(fig.axes) == 5 and fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "symlog"
    aligned = plot_refined_llc(runs, align=True)  # val/acc first reaches halfway (0.505) at step 750
    assert list(aligned.axes[0].lines[0].get_xdata()) == [-500, -250, 0]
    table = summary_table(runs)
    row = next(line for line in table.splitlines() if line.startswith("| llc/whole |"))
    assert "420 (400–440)" in row and row.endswith("| 500, 500 |")


def test_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
