"""The run's figures and console: training.png's panels (axes, titles, the heatmap's values and
its colour centre), the dense layout, smoothing by hand, the history a resumed run plots, the
`python -m epmoe.plot` command, the console's fixed columns and train.log's rule for the
progress bar's carriage returns."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from epmoe.config import Config, LoggerConfig
from epmoe.plot import main as plot_main
from epmoe.train.console import ConsoleLog, format_line, human
from epmoe.train.loggers import Loggers
from epmoe.train.plots import MAX_HEATMAPS, expert_load_images, smooth, training_figure
from epmoe.train.runs import labels, summary_table

E = 4


def _history(steps: int, blocks: list[int], val_every: int = 2) -> list[dict]:
    """Records as the trainer writes them: layer y's expert e gets (e + 1) * (y + 1) * step tokens."""
    out = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 5.0 / s, "lr": 1e-3 * s, "grad_norm": 2.0 / s, "tokens_per_s": 1000.0 * s}
        if blocks:
            r["expert_load"] = [[(e + 1) * (y + 1) * s for e in range(E)] for y in range(len(blocks))]
            for y, b in enumerate(blocks):
                r.update({f"moe/L{b}/imbalance": 1.0 + y, f"moe/L{b}/aux_loss": 0.01, f"moe/L{b}/drop_frac": 0.0})
        if s % val_every == 0:
            r["val_loss"] = 4.0 / s
        out.append(r)
    return out


def test_moe_figure_has_the_four_panels_with_one_heatmap_per_layer_centred_on_the_uniform_share() -> None:
    fig = training_figure(_history(6, blocks=[1, 3]), title="run X")
    titles = [ax.get_title() for ax in fig.axes]
    # loss | lr + its gradient-norm twin | 3 stacked routing axes | 2 heatmaps | their colour bar
    assert len(fig.axes) == 1 + 2 + 3 + 2 + 1
    assert titles[:3] == ["loss", "learning rate and gradient norm", ""]
    assert "per MoE layer (L = block index)" in titles
    assert sum(t.startswith("expert load over time") for t in titles) == 1
    assert [ax.get_ylabel() for ax in fig.axes if ax.images] == ["L1\nexpert", "L3\nexpert"]
    assert fig._suptitle.get_text() == "run X"
    heat = [ax for ax in fig.axes if ax.images][1].images[0]
    share_TE = np.array([[(e + 1) / 10 for e in range(E)]] * 6)  # each step: (e + 1) / (1 + 2 + 3 + 4)
    np.testing.assert_allclose(heat.get_array(), share_TE.T)  # experts up, steps across
    assert heat.norm.vcenter == pytest.approx(1 / E)  # white = the uniform share


def test_dense_figure_draws_no_routing_panels() -> None:
    fig = training_figure(_history(4, blocks=[]))
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate and gradient norm", ""]
    assert not any(ax.images for ax in fig.axes)
    assert expert_load_images(_history(4, blocks=[])) == {}


def test_many_layers_show_evenly_spaced_heatmaps_and_say_so() -> None:
    blocks = list(range(12))
    fig = training_figure(_history(3, blocks))
    heat = [ax for ax in fig.axes if ax.images]
    assert len(heat) == MAX_HEATMAPS
    assert heat[0].get_ylabel() == "L0\nexpert" and heat[-1].get_ylabel() == "L11\nexpert"
    assert any(f"{MAX_HEATMAPS} of 12 layers" in ax.get_title() for ax in fig.axes)


def test_expert_load_images_are_one_rgb_image_per_layer() -> None:
    images = expert_load_images(_history(3, blocks=[0, 2]))
    assert sorted(images) == ["expert_load/L0", "expert_load/L2"]
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in images.values())


def test_smoothing_is_the_debiased_moving_average() -> None:
    np.testing.assert_allclose(smooth([3.0, 3.0, 3.0]), [3.0, 3.0, 3.0])  # no pull towards 0
    # avg1 = 0.5*0 = 0 -> 0/(1-0.5); avg2 = 0.5*0 + 0.5*10 = 5 -> 5/(1-0.25)
    np.testing.assert_allclose(smooth([0.0, 10.0], weight=0.5), [0.0, 20 / 3])


def test_a_resumed_run_plots_its_whole_history_and_logs_each_step_once(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _history(6, [0])) + '{"step": 7, "lo')  # torn line
    loggers = Loggers(LoggerConfig(console=False), tmp_path, Config(), write=print, start_step=4)
    try:
        assert [r["step"] for r in loggers.history] == [1, 2, 3, 4]  # what the resumed run's figure starts from
        loggers.log({"step": 5, "loss": 1.0, "lr": 1e-3}, console=False)
    finally:
        loggers.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def _run_dir(root: Path, name: str, overrides: list[str], steps: int) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _history(steps, [0])))
    return run


def test_plot_cli_redraws_one_run_and_overlays_a_sweep_labelled_by_what_it_changed(tmp_path: Path, capsys) -> None:
    a = _run_dir(tmp_path, "0", ["router.top_k=2", "train.steps=4"], 4)
    b = _run_dir(tmp_path, "1", ["router.top_k=4", "train.steps=4"], 4)
    assert labels([a, b]) == ["router.top_k=2", "router.top_k=4"]
    assert plot_main([str(a)]) == 0 and (a / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_main([str(a), str(b)]) == 0 and (tmp_path / "compare.png").is_file()
    assert plot_main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line
    with pytest.raises(SystemExit) as e, redirect_stdout(io.StringIO()) as out:
        plot_main(["--help"])
    assert e.value.code == 0 and "RUN_DIR" in out.getvalue()


def test_summary_table_has_a_row_per_job_with_its_final_validation_and_median_rate(tmp_path: Path) -> None:
    a = _run_dir(tmp_path, "0", ["router.top_k=2"], 4)
    b = _run_dir(tmp_path, "1", ["router.top_k=4"], 6)
    rows = summary_table([a, b], exit_codes=[0, 1]).splitlines()
    assert rows[0] == "| job | overrides | exit | steps | val loss | bits/byte | tok/s |"
    # val loss of the last evaluated step (4/s), tokens/s median of steps 2.. (1000*s)
    assert rows[2] == "| 0 | router.top_k=2 | 0 | 4 | 1.0000 | - | 3k |"
    assert rows[3] == "| 1 | router.top_k=4 | 1 | 6 | 0.6667 | - | 4k |"


def test_console_line_has_fixed_columns_with_units() -> None:
    record = {"step": 12, "loss": 2.41234, "tokens_per_s": 5210.0, "mfu": 0.0312, "mem_gib": 1.2071, "lr": 2.1e-3,
              "step_ms": 412.4, "val_loss": 2.3012, "val_bpb": 1.2345, "moe/L1/imbalance": 3.0}  # fmt: skip
    assert format_line(record, 300) == (
        "step  12/300 | loss 2.412 | 5.21k tok/s | mfu  3.1% | 1.21 GiB | lr 2.1e-03 |  412 ms/step | val 2.301 | "
        "1.234 bpb"
    )
    assert human(999) == "999" and human(1520) == "1.52k" and human(2.5e6) == "2.5M"


def test_train_log_keeps_each_line_as_the_terminal_finally_shows_it(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    with ConsoleLog(log):
        sys.stderr.write("train:  10%|#  | 1/10\rtrain:  20%|## | 2/10")  # the bar redrawing itself
        sys.stderr.write("\r" + " " * 20 + "\r")  # tqdm.write clearing it
        print("step 2/10 | loss 3.000")
        sys.stderr.write("train: 100%|###| 10/10\n")  # the bar's final line
        print("unfinished", end="")
    print("after it closed")  # the streams are restored: not in the file
    assert log.read_text() == "step 2/10 | loss 3.000\ntrain: 100%|###| 10/10\nunfinished\n"
