"""python -m epmoe.eval: a checkpoint's held-out loss is step.evaluate's on the same model and
data, in nats/token, bits/token and bits/byte; data.* and the evaluation's train.* keys
override, any other key is one line and exit 2; --help names the arguments."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epmoe import eval as eval_cli
from epmoe.config import Config
from epmoe.parallel.parallelize import Parallel
from epmoe.train.cli import load_config
from epmoe.train.data import load_splits
from epmoe.train.step import evaluate
from tests.conftest import REPO, TINY
from tests.tiny_checkpoint import random_model, save_checkpoint


def _reference(cfg: Config, model: torch.nn.Module, **train_changes) -> tuple[float, float]:
    """(step.evaluate's loss, the val split's bytes per token) for cfg with train_changes."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_changes))
    data = load_splits(cfg.data, cfg.model.vocab_size)
    return evaluate(model, data, cfg, torch.device("cpu"), Parallel.single(cfg.model.num_experts)), \
        data.val_bytes_per_token  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, text_corpus_dir: Path) -> tuple[Path, Config, torch.nn.Module]:
    cfg = load_config([*TINY, "data=text", f"data.path={text_corpus_dir}", "train.eval_batches=3"])
    model = random_model(cfg)
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    save_checkpoint(run_dir, cfg, model)
    return run_dir, cfg, model


def test_the_loss_is_step_evaluates_on_the_runs_held_out_batches(saved, capsys: pytest.CaptureFixture) -> None:
    run_dir, cfg, model = saved
    loss, bytes_per_token = _reference(cfg, model)
    assert eval_cli.main([str(run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"checkpoint {run_dir / 'checkpoints' / 'step_00000000'}; held-out data: {cfg.data.path}")
    bits = loss / math.log(2)
    assert out[1].startswith(
        f"held-out loss {loss:.6f} nats/token, {bits:.6f} bits/token, "
        f"{bits / bytes_per_token:.6f} bits/byte (3 batches of 4 x 32 tokens, seed 0, fp32; "
    )
    assert bytes_per_token == 1.0  # bytes: a token is a byte


def test_data_and_evaluation_keys_override(saved, capsys: pytest.CaptureFixture) -> None:
    run_dir, cfg, model = saved
    overrides = ["data.val_fraction=0.3", "train.eval_batches=2", "train.batch_size=2", "train.seed=7"]
    # a data group resets its keys to the defaults, but the tokenizer and seq_len stay the model's
    overrides += ["data=text", f"data.path={cfg.data.path}"]
    result, used, _ = eval_cli.evaluate_checkpoint(run_dir, overrides)
    assert (used.data.val_fraction, used.train.eval_batches, used.train.batch_size) == (0.3, 2, 2)
    assert (used.data.seq_len, used.data.tokenizer) == (32, None)
    changed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.3))
    loss, _ = _reference(changed, model, eval_batches=2, batch_size=2, seed=7)
    assert result.val_loss == pytest.approx(loss, rel=1e-9, abs=0)
    assert result.val_loss != pytest.approx(_reference(cfg, model)[0], rel=1e-6)  # other batches, other loss


def test_an_imported_models_tokenizer_stays_under_a_data_group_and_gives_bits_per_byte(
    tmp_path: Path, text_corpus: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("transformers")
    from epmoe.hf.__main__ import main as hf_main
    from epmoe.hf.convert import from_pretrained
    from tests.hf_tiny import save, save_tokenizer
    from tests.test_tokenized_data import DOCS, VOCAB

    hf_dir = save_tokenizer(save("qwen3_moe", tmp_path / "q", vocab_size=VOCAB), DOCS, VOCAB)
    assert hf_main(["import", str(hf_dir), str(tmp_path / "run")]) == 0  # data.tokenizer: the folder
    result, used, _ = eval_cli.evaluate_checkpoint(tmp_path / "run", ["data=text", f"data.path={text_corpus}"])
    assert used.data.tokenizer == str(hf_dir)
    cfg, model = from_pretrained(hf_dir)
    cfg = dataclasses.replace(cfg, data=used.data)
    loss, bytes_per_token = _reference(cfg, model, batch_size=used.train.batch_size)
    assert result.val_loss == pytest.approx(loss, rel=1e-6) and bytes_per_token > 1.5  # BPE: several bytes a token
    assert result.val_bpb == pytest.approx(loss / math.log(2) / bytes_per_token, rel=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.foo=1", "error: Could not override 'data.foo': Key 'foo' not in 'DataConfig'"),
        ("model.d_model=8", "error: model.d_model cannot be overridden in an evaluation: give data=<group>"),
        ("train.lr=1", "error: train.lr cannot be overridden in an evaluation"),
        ("data.path", "error: 'data.path' is not an override: give key=value"),
    ],
)
def test_another_key_is_one_line_and_exit_2(saved, override: str, message: str, capsys) -> None:
    run_dir, _, _ = saved
    assert eval_cli.main([str(run_dir), override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(message), err


def test_help_names_the_arguments_and_a_missing_path_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "epmoe.eval", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0
    for name in ("checkpoint", "overrides", "data.<key>=value", "train.eval_batches"):
        assert name in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "epmoe.eval", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'nope'} does not exist; pass a checkpoint directory "
                                        "(checkpoints/step_<N>) or a run dir"]  # fmt: skip
