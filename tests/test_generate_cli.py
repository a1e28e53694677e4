"""python -m epmoe.generate: a checkpoint's or a Hugging Face folder's continuation is the one
Transformer.generate makes without a cache (the slow reference), decoded by the model's own
tokenizer; --help names the arguments; a bad path is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epmoe import generate
from epmoe.data.tokenizer import ByteTokenizer, HFTokenizer
from epmoe.train.cli import load_config
from tests.conftest import REPO, TINY
from tests.tiny_checkpoint import random_model, save_checkpoint

PROMPT = "def function_3_4(x):\n"


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = generate.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_checkpoints_greedy_and_sampled_text_is_the_references(tmp_path: Path, text_corpus: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    cfg = load_config([*TINY, "data=text", f"data.path={text_corpus}"])
    model = random_model(cfg)
    save_checkpoint(tmp_path / "run", cfg, model)
    tok = ByteTokenizer()
    prompt_S = tok.encode_docs([PROMPT.encode()]).tokens.long()
    greedy = tok.decode(model.generate(prompt_S, 40, 0, use_cache=False).tolist())  # crosses max_seq_len 32
    sampled = tok.decode(model.generate(prompt_S, 20, 0.8, torch.Generator().manual_seed(3), use_cache=False).tolist())
    assert greedy != sampled

    base = [str(tmp_path / "run"), "--prompt", PROMPT, "--device", "cpu"]
    code, out, err = _run([*base, "--max-new-tokens", "40", "--temperature", "0"], capsys)
    assert code == 0 and out == greedy + "\n"
    assert err.startswith("40 new tokens in ") and f"(greedy, KV cache, cpu; prompt {len(prompt_S)} tokens;" in err
    code, out, err = _run([*base, "--max-new-tokens", "40", "--temperature", "0", "--no-cache"], capsys)
    assert code == 0 and out == greedy + "\n" and "(greedy, no cache, cpu;" in err
    code, out, err = _run([*base, "--max-new-tokens", "20", "--seed", "3"], capsys)  # temperature 0.8
    assert code == 0 and out == sampled + "\n" and "(temperature 0.8, seed 3, KV cache" in err


def test_a_hugging_face_folder_and_its_import_generate_with_the_folders_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("transformers")
    from epmoe.hf.__main__ import main as hf_main
    from epmoe.hf.convert import from_pretrained
    from tests.hf_tiny import save, save_tokenizer
    from tests.test_tokenized_data import DOCS, VOCAB

    hf_dir = save_tokenizer(save("qwen3_moe", tmp_path / "q", vocab_size=VOCAB), DOCS, VOCAB)
    tok = HFTokenizer(str(hf_dir))
    _, model = from_pretrained(hf_dir)
    prompt_S = tok.encode_docs([b"def f_3(x):"]).tokens.long()
    expected = tok.decode(model.eval().generate(prompt_S, 12, 0, use_cache=False).tolist())
    args = ["--prompt", "def f_3(x):", "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]
    code, out, err = _run([str(hf_dir), *args], capsys)
    assert code == 0 and out == expected + "\n", err
    assert f"{hf_dir} (qwen3_moe)" in err
    # imported as a checkpoint (train.init_from's folder): its tokenizer is still the folder's
    assert hf_main(["import", str(hf_dir), str(tmp_path / "run")]) == 0
    capsys.readouterr()  # the import's own line
    code, out, err = _run([str(tmp_path / "run"), *args], capsys)
    assert code == 0 and out == expected + "\n", err
    assert "(qwen3_moe, step 0)" in err


def test_help_names_the_arguments_and_a_bad_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    proc = subprocess.run([sys.executable, "-m", "epmoe.generate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0
    for name in ("source", "--prompt", "--max-new-tokens", "--temperature", "--seed", "--no-cache", "--device"):
        assert name in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "epmoe.generate", str(tmp_path / "nope"), "--prompt", "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'nope'} does not exist; pass a checkpoint directory, "
                                        "a run directory or a Hugging Face model folder"]  # fmt: skip
    code, out, err = _run([str(tmp_path), "--prompt", "x"], capsys)  # a folder holding no checkpoint
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: no complete checkpoint (checkpoints/step_<N>/manifest.json) under {tmp_path}")
