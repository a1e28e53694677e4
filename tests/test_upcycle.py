"""Dense -> MoE upcycling (python -m epmoe.upcycle): copy and granular compute the dense model's
function exactly (an epmoe checkpoint and a Hugging Face llama folder, against transformers itself);
clusters' experts partition the dense FFN and its router sends tokens to the experts that fire for
them; the output trains from step 0 with the dense model's first loss; bad input is one line, exit 2.

Shape key: B sequences, S sequence length, T tokens, D model width, V vocabulary, E experts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epmoe.model.experts import activation_fn
from epmoe.model.transformer import Transformer
from epmoe.parallel.parallelize import Parallel
from epmoe.train import checkpoint_state
from epmoe.train.checkpoint_model import load_model
from epmoe.train.cli import load_config
from epmoe.train.data import load_splits
from epmoe.train.engine import build_optimizer, build_schedule
from epmoe.upcycle import load_dense, split_overrides, target_config, upcycle
from epmoe.upcycle.__main__ import main
from epmoe.upcycle.assemble import ffn_inputs, tokens
from tests.conftest import TINY

# the dense twin of TINY: every FFN hidden 64, fp32 so that "equal" means to float rounding
DENSE = [*TINY, "model.num_experts=0", "model.n_shared_experts=0", "train.precision=fp32", "train.eval_batches=1",
         "train.sample_bytes=0"]  # fmt: skip
FAST = ["upcycle.calib_tokens=1024", "upcycle.eval_tokens=512"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory, text_corpus_dir: Path) -> Path:
    """A dense epmoe model saved at step 0 (as `python -m epmoe.hf import` saves one), its
    embeddings redrawn large enough that the FFNs move the logits."""
    run = tmp_path_factory.mktemp("dense") / "run"
    cfg = load_config([*DENSE, "data=text", f"data.path={text_corpus_dir}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.router)
    with torch.no_grad():
        model.embed.weight.normal_(std=0.5)
    opt = build_optimizer(model, cfg.train)
    checkpoint_state.save(run, 0, model=model, optimizer=opt, scheduler=build_schedule(opt, cfg.train), cfg=cfg,
                          rank=0, dims=Parallel.single(0).dims, placement=None)  # fmt: skip
    return run


def _logits(model: torch.nn.Module, tokens_BS: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens_BS).logits_BSV


def _random_tokens(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))


def _upcycled(dense_run: Path, overrides: list[str]):
    """(dense cfg, dense model, MoE cfg, MoE model, report), in process."""
    opts, user = split_overrides([*FAST, *overrides])
    dense_cfg, dense = load_dense(dense_run)
    cfg = target_config(dense_cfg, opts, user)
    model, report = upcycle(dense, cfg, opts, load_splits(cfg.data, cfg.model.vocab_size))
    return dense_cfg, dense, cfg, model, report, opts


def test_copy_equals_the_dense_model(dense_run: Path, tmp_path: Path) -> None:
    """Every FFN layer becomes 8 copies of its FFN; routed_scaling 2.5 is undone on the down
    projections: the logits are the dense model's."""
    assert main([str(dense_run), str(tmp_path / "up"), *FAST, "router.routed_scaling=2.5"]) == 0
    up = load_model(tmp_path / "up")
    assert up.manifest["step"] == 0
    m = up.cfg.model
    assert (m.num_experts, m.expert_hidden, m.n_shared_experts, up.model.moe_blocks()) == (8, 64, 0, [0, 1])
    tokens_BS = _random_tokens()
    diff = (_logits(up.model, tokens_BS) - _logits(load_model(dense_run).model, tokens_BS)).abs().max().item()
    assert diff <= 1e-5


def test_copy_of_a_hugging_face_llama_equals_transformers(tmp_path: Path) -> None:
    """A tiny random llama folder upcycled by copy computes transformers' own llama logits."""
    transformers = pytest.importorskip("transformers")
    from tests.hf_tiny import save

    folder = save("llama", tmp_path / "llama", vocab_size=256)  # 256: its calibration data is bytes
    assert main([str(folder), str(tmp_path / "up"), "model.num_experts=4", *FAST]) == 0
    up = load_model(tmp_path / "up")
    assert (up.cfg.model.family.value, up.cfg.model.num_experts) == ("mixtral", 4)  # exports as mixtral
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens_BS = _random_tokens()
    with torch.no_grad():
        theirs_BSV = ref(tokens_BS).logits
    assert (_logits(up.model, tokens_BS) - theirs_BSV).abs().max().item() <= 1e-5


def test_granular_with_whole_copies_and_shared_units_is_exact(dense_run: Path) -> None:
    """granularity 4 with top_k 4 (the default: one whole copy per token), 16 shared units carved
    out first: 4 shards of 12 units, virtual-group router rows, scale G: exact."""
    _, dense, cfg, model, report, _ = _upcycled(dense_run, ["upcycle.method=granular", "upcycle.shared_units=16"])
    m = cfg.model
    assert (m.num_experts, m.expert_hidden, m.shared_hidden, cfg.router.top_k) == (8, 12, 16, 4)
    assert report.exact_layers == [0, 1] and report.rel_logits_error <= 1e-5
    tokens_BS = _random_tokens()
    assert (_logits(model, tokens_BS) - _logits(dense, tokens_BS)).abs().max().item() <= 1e-5


def test_granular_fewer_choices_than_shards_reports_its_deviation(dense_run: Path) -> None:
    """top_k 2 of granularity 4 drops half of each token's units: not exact, the fitted scale near
    2 / G (two shards of weight 1/2 each should count 1), and the deviation reported and bounded."""
    *_, report, _ = _upcycled(dense_run, ["upcycle.method=granular", "router.top_k=2"])
    assert report.exact_layers == [] and set(report.scales) == {0, 1}
    assert all(0.3 < s < 0.8 for s in report.scales.values()), report.scales
    assert 1e-3 < report.rel_logits_error < 0.5 and report.kl > 0


def test_clusters_partition_the_ffn_and_route_to_the_units_that_fire(dense_run: Path) -> None:
    """clusters: the 8 experts of 8 units partition each dense FFN (their outputs, unscaled, add up
    to it); the router's top-2 holds the expert that fires most for a calibration token far more
    often than chance (2/8), and more often than a random router does; the deviation is reported."""
    _, dense, cfg, model, report, opts = _upcycled(dense_run, ["upcycle.method=clusters"])
    assert (cfg.model.num_experts, cfg.model.expert_hidden, cfg.router.top_k) == (8, 8, 2)
    splits = load_splits(cfg.data, cfg.model.vocab_size)
    calib = ffn_inputs(dense, tokens(splits, opts.calib_tokens, cfg.data.seq_len, opts.seed, val=False))
    for i, block in enumerate(model.blocks):
        x_TD, experts = calib[i], block.ffn.experts
        T, E = x_TD.shape[0], cfg.model.num_experts
        with torch.no_grad():
            all_TD = experts.forward_loop(x_TD.repeat(E, 1), torch.full((E,), T)).view(E, T, -1).sum(0)
            dense_TD = dense.blocks[i].ffn(x_TD)
            # each expert's mean unit magnitude on each token, from its own weights
            fire_TE = torch.stack([activation_fn("swiglu", x_TD @ experts.w_gate_EDF[e], x_TD @ experts.w_up_EDF[e])
                                   .abs().mean(1) for e in range(E)], dim=1)  # fmt: skip
            ours = _hit_rate(block.ffn.router(x_TD).topk_idx_TK, fire_TE)
            block.ffn.router.gate.weight.normal_(generator=torch.Generator().manual_seed(i))
            random = _hit_rate(block.ffn.router(x_TD).topk_idx_TK, fire_TE)
        assert ((all_TD / report.scales[i] - dense_TD).norm() / dense_TD.norm()).item() <= 1e-5
        assert abs(ours - report.hit_rate[i]) < 1e-6
        assert ours >= 2.5 * report.chance and ours > random + 0.3, (i, ours, random)
    assert report.chance == 0.25
    assert 0.05 < report.rel_logits_error < 0.9 and report.kl > 0


def _hit_rate(topk_idx_TK: torch.Tensor, fire_TE: torch.Tensor) -> float:
    return (topk_idx_TK == fire_TE.argmax(1, keepdim=True)).any(1).float().mean().item()


# a new run's train.* (train.init_from takes model, router and data from the checkpoint, not train.*)
TRAIN = ["train=smoke", "train.precision=fp32", "train.eval_batches=1", "train.sample_bytes=0", "train.steps=3",
         "train.eval_every=0", "logger.progress=false", "logger.plots=false"]  # fmt: skip


def test_upcycled_checkpoints_train_from_step_0_with_the_dense_first_loss(dense_run: Path, tmp_path: Path) -> None:
    """train.init_from=<upcycled run> (a new run) and train.resume=<upcycled run> both train 3
    steps from step 0 with a fresh optimizer, to the same losses; copy's first loss is the dense
    model's on the same batch."""
    from epmoe.train.trainer import train

    dense_losses = train(load_config([f"train.resume={dense_run}", "train.steps=3", "train.eval_every=0"]),
                         tmp_path / "dense").losses  # fmt: skip
    for method in ("copy", "clusters"):
        out = tmp_path / method
        assert main([str(dense_run), str(out), f"upcycle.method={method}", *FAST]) == 0
        started = train(load_config([f"train.init_from={out}", *TRAIN]), tmp_path / f"{method}_init").losses
        resumed = train(load_config([f"train.resume={out}", "train.steps=3", "train.eval_every=0"]),
                        tmp_path / f"{method}_resume").losses  # fmt: skip
        assert len(started) == 3 and all(torch.isfinite(torch.tensor(started))), (method, started)
        assert started == pytest.approx(resumed, rel=1e-6), (method, started, resumed)
        if method == "copy":
            assert abs(started[0] - dense_losses[0]) <= 1e-5 * abs(dense_losses[0]), (started, dense_losses)


def test_init_from_an_upcycled_checkpoint_reshards_to_ep2_with_and_without_fsdp(dense_run: Path,
                                                                                tmp_path: Path) -> None:  # fmt: skip
    """The one-process step-0 checkpoint of a clusters upcycle (8 different experts) starts a run
    at world 2 / EP 2 (each rank reads its 4 experts' rows) and at world 2 / EP 2 with FSDP2 (its
    shards of the dense weights): the same losses as one process on the same global batch."""
    from epmoe.train.trainer import train
    from tests.ranks import spawn_jobs

    out = tmp_path / "clusters"
    assert main([str(dense_run), str(out), "upcycle.method=clusters", *FAST]) == 0
    start = [f"train.init_from={out}", *TRAIN]
    single = train(load_config([*start, "train.batch_size=4"]), tmp_path / "one").losses
    runs = spawn_jobs(2, [([*start, "train.batch_size=2", "parallel.ep=2", f"parallel.fsdp={fsdp}"],
                           tmp_path / f"ep2_fsdp_{fsdp}") for fsdp in ("false", "true")])  # fmt: skip
    for fsdp, run in zip(("false", "true"), runs):
        assert run["losses"] == pytest.approx(single, rel=1e-5), (fsdp, run["losses"], single)


def test_init_from_refuses_another_architecture_and_a_missing_path(dense_run: Path, tmp_path: Path) -> None:
    """Before any rank starts: an override that changes the checkpoint's architecture, and a path
    that is neither a Hugging Face folder nor a checkpoint, are one-line errors naming the fix."""
    from epmoe.train.checkpoint_files import CheckpointError
    from epmoe.train.preflight import check

    out = tmp_path / "copy"
    assert main([str(dense_run), str(out), *FAST]) == 0
    cfg = load_config([f"train.init_from={out}", *TRAIN, "model.n_heads=4"])
    with pytest.raises(CheckpointError, match=r"model.n_heads 2 \(saved\) vs 4 \(now\); train.init_from takes the "
                                              r"checkpoint's model and router: drop those overrides"):  # fmt: skip
        check(cfg, tmp_path / "run", ranks_on_node=1)
    with pytest.raises(CheckpointError, match="does not exist; give a Hugging Face folder"):
        load_config([f"train.init_from={tmp_path / 'nowhere'}", *TRAIN])


@pytest.mark.parametrize(
    "source, overrides, says",
    [
        ("moe", [], "already an MoE model (model.num_experts=8)"),
        ("dense", ["upcycle.method=granular", "upcycle.granularity=3"], "upcycle.granularity=3 does not divide"),
        ("missing", [], "does not exist"),
        ("dense", ["upcycle.method=copy", "upcycle.shared_units=8"], "use upcycle.method=granular or clusters"),
        ("dense", ["upcycle.metod=copy"], "unknown option upcycle.metod"),
    ],
)
def test_bad_input_is_one_line_exit_2(dense_run: Path, tmp_path: Path, capsys, source, overrides, says) -> None:
    if source == "moe":  # an upcycled model is an MoE model
        assert main([str(dense_run), str(tmp_path / "moe"), *FAST]) == 0
        capsys.readouterr()
    path = {"dense": dense_run, "moe": tmp_path / "moe", "missing": tmp_path / "nowhere"}[source]
    assert main([str(path), str(tmp_path / "out"), *overrides]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_help_lists_the_methods(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "upcycle.method=copy|granular|clusters" in capsys.readouterr().out
