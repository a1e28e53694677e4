"""Generation with a key/value cache equals generation without one (the slow reference): the
same greedy and seeded-sampled tokens, inside the context and past it, for every attention
variant (multi-head with interleaved RoPE, grouped-query with QK-norm per head or over the
projection, q/k/v biases, MLA); a cached step's logits are the full forward's; under expert
parallelism (2 gloo ranks, one token per rank per step) the tokens are the single process's.
The command line (python -m epmoe.generate) is tests/test_generate_cli.py.

Shape key: S sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from epmoe.config import CommConfig, Config, ModelConfig, ParallelConfig, RouterConfig, TrainConfig
from epmoe.model.kv_cache import KVCache
from epmoe.model.transformer import Transformer

from .conftest import free_port
from .hf_tiny import perturbed

# the native model: multi-head attention, interleaved RoPE, a dense first layer, a shared expert
NATIVE = ModelConfig(d_model=32, n_layers=3, n_heads=4, max_seq_len=48, num_experts=4, expert_hidden=16,
                     shared_hidden=16, dense_hidden=32, first_dense_layers=1)  # fmt: skip
# conf/model/<family>_tiny.yaml: qwen3_moe grouped-query heads with QK-norm per head and half RoPE,
# olmoe QK-norm over the whole projection, qwen2_moe q/k/v biases and a gated shared expert,
# deepseek_v3 MLA (low-rank q, one rotary key) with sigmoid group-limited routing
FAMILIES = ["qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"]
MODELS = ["native", *FAMILIES]


@functools.cache
def configs(name: str) -> tuple[ModelConfig, RouterConfig]:
    if name == "native":
        return NATIVE, RouterConfig()
    from epmoe.train.cli import load_config

    cfg = load_config([f"model={name}_tiny"])
    return cfg.model, cfg.router


def build(name: str, seed: int = 0, **model_changes) -> Transformer:
    """The named tiny model, `perturbed` (tests/hf_tiny.py): random weights and balancing biases."""
    model_cfg, router_cfg = configs(name)
    torch.manual_seed(seed)
    return perturbed(Transformer(dataclasses.replace(model_cfg, **model_changes), router_cfg), "expert_bias_E")


def prompt(n: int, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_with_the_cache_are_those_without(name: str) -> None:
    model = build(name)
    p_S = prompt(7)
    cached = model.generate(p_S, 24, temperature=0)
    reference = model.generate(p_S, 24, temperature=0, use_cache=False)
    assert cached.tolist() == reference.tolist()
    assert cached[:7].tolist() == p_S.tolist() and len(cached) == 31
    # greedy is the argmax of the full forward at every position it chose
    logits_SV = model(cached[:-1].unsqueeze(0)).logits_BSV[0]
    assert cached[7:].tolist() == logits_SV[6:].argmax(-1).tolist()


@pytest.mark.parametrize("name", MODELS)
def test_a_cached_step_has_the_full_forwards_logits(name: str) -> None:
    model = build(name)
    tokens_1S = prompt(20).unsqueeze(0)
    with torch.no_grad():
        full_SV = model(tokens_1S).logits_BSV[0]
        cache = KVCache(len(model.blocks), 20)
        steps = [model(tokens_1S[:, :9], cache).logits_BSV[0]]  # the prompt
        steps.append(model(tokens_1S[:, 9:13], cache).logits_BSV[0])  # 4 new positions after 9 cached ones
        steps += [model(tokens_1S[:, i : i + 1], cache).logits_BSV[0] for i in range(13, 20)]  # one at a time
    assert cache.length == 20
    # to float rounding: within 3e-5 + 1e-5 x |logit| (the logits of these weights reach ~10, and
    # the rounding of a logit follows the size of the sums behind it, not its own: with 2 threads
    # a 4-row step and the 20-row forward block their matmuls differently, 1.4e-5 apart at worst)
    torch.testing.assert_close(torch.cat(steps), full_SV, atol=3e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"the KV cache holds 20 positions \(20 filled\), no room for 1 more"):
        model(tokens_1S[:, :1], cache)


@pytest.mark.parametrize("name", ["native", "qwen3_moe", "deepseek_v3"])
def test_past_the_context_the_tokens_are_still_those_without_the_cache(name: str) -> None:
    """max_seq_len 16: the window slides after 16 tokens (the cached path runs it whole then)."""
    model = build(name, max_seq_len=16)
    for p_S in (prompt(5), prompt(21)):  # into the context and past it; a prompt longer than it
        for temperature in (0.0, 1.0):
            g_cached, g_reference = (torch.Generator().manual_seed(3) for _ in range(2))
            cached = model.generate(p_S, 30, temperature, g_cached)
            reference = model.generate(p_S, 30, temperature, g_reference, use_cache=False)
            assert cached.tolist() == reference.tolist(), (len(p_S), temperature)


@pytest.mark.parametrize("name", ["native", "deepseek_v3"])
def test_seeded_sampling_with_the_cache_draws_the_tokens_without(name: str) -> None:
    model = build(name)
    p_S = prompt(6)
    runs = {}
    for seed in (0, 1):
        for use_cache in (True, False):
            g = torch.Generator().manual_seed(seed)
            runs[seed, use_cache] = model.generate(p_S, 30, 0.8, g, use_cache=use_cache).tolist()
    assert runs[0, True] == runs[0, False] and runs[1, True] == runs[1, False]
    assert runs[0, True] != runs[1, True]  # it samples: another seed, other tokens


def test_capacity_routing_generates_without_the_cache() -> None:
    """A capacity factor drops by the whole window's choices: caching would change the tokens."""
    model_cfg, _ = configs("native")
    torch.manual_seed(0)
    model = Transformer(model_cfg, RouterConfig(capacity_factor=1.0)).eval()
    assert not model.caches_exactly() and build("native").caches_exactly()
    p_S = prompt(10)
    assert model.generate(p_S, 12, 0).tolist() == model.generate(p_S, 12, 0, use_cache=False).tolist()


def test_a_negative_temperature_or_an_empty_prompt_is_refused() -> None:
    model = build("native")
    with pytest.raises(ValueError, match="use 0 for greedy decoding"):
        model.generate(prompt(3), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="non-empty 1-D tensor"):
        model.generate(torch.zeros(0, dtype=torch.long), 2)


# --- expert parallelism: every rank generates, one token each per cached step ---


def _ep_worker(rank: int, world: int, port: int, out: str) -> None:
    from epmoe.comm.process import end_process
    from epmoe.parallel.parallelize import parallelize

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for dispatcher in ("alltoall", "pipelined"):
        model = build("native")  # the same weights on every rank; parallelize keeps this rank's experts
        cfg = Config(model=model.cfg, router=configs("native")[1], parallel=ParallelConfig(ep=world),
                     comm=CommConfig(dispatcher=dispatcher, chunks=2),
                     train=TrainConfig(collective_timeout_s=60))  # fmt: skip
        parallelize(model, cfg, torch.device("cpu"))
        g = torch.Generator().manual_seed(5)
        results[dispatcher] = {
            "greedy": model.generate(prompt(7), 20, 0).tolist(),
            "greedy_no_cache": model.generate(prompt(7), 20, 0, use_cache=False).tolist(),
            "sampled": model.generate(prompt(7), 20, 0.8, g).tolist(),
        }
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    end_process(0)  # as the rank entry point ends (see end_process)


def test_under_expert_parallelism_every_rank_generates_the_single_process_tokens(tmp_path: Path) -> None:
    out = tmp_path / "ep.json"
    mp.spawn(_ep_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    model = build("native")
    expected = {
        "greedy": model.generate(prompt(7), 20, 0, use_cache=False).tolist(),
        "sampled": model.generate(prompt(7), 20, 0.8, torch.Generator().manual_seed(5), use_cache=False).tolist(),
    }
    for dispatcher, got in json.loads(out.read_text()).items():
        assert got["greedy"] == got["greedy_no_cache"] == expected["greedy"], dispatcher
        assert got["sampled"] == expected["sampled"], dispatcher
