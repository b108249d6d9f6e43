"""The Cosmos AR model at TP2 x PP2 with sequence parallelism equals the single-process model.

One torchrun world of 4 gloo processes (spawned once for the module; this file is its worker
script) loads the weights of a single-process reference through megatron's dist_checkpointing
(resharding them to its layout), runs one forward/backward through megatron's pipeline schedule
and ``finalize_model_grads`` (the trainer's path: DDP grad buffers, SP and Q/K-norm grads summed
over TP, the PP-replicated learnable position table summed over PP), and writes its per-token loss
and its gradients as a sharded checkpoint, which the test reads back as global tensors; then,
re-laid out as TP2 x DP2, it generates with the KV cache (greedy and sampled). The model
is the Video2World variant with a learnable absolute table: every TP/SP/PP path of the AR model
(vocab-parallel embedding and loss, GQA over TP, cross-attention context split under SP, <bov>
and padding positions) is in the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TP, PP = 2, 2
GRID = (3, 4, 4)
BATCH, CTX = 2, 8


def _cfg():
    from nemo_ext.models.ar.config import ARConfig
    from nemo_ext.tokenizers.discrete import DiscreteTokenizerConfig

    return ARConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    max_size=[4, 8, 8], context_dim=32, cross_attention=True, bov_token=True, abs_pos_emb="learnable",
                    attention_backend="math", name="tiny", tokenizer=DiscreteTokenizerConfig(levels=[8, 5, 5, 5]))


def _batch(cfg) -> dict:
    """<bov> + 48 grid tokens + 1 padding token (50: divisible by TP for SP); the padding and a few
    positions carry no loss; one sample's context is half padding."""
    g = torch.Generator().manual_seed(1)
    s = cfg.seq_length(GRID, multiple=TP)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, s), generator=g)
    tokens[:, 0] = cfg.bov_id
    labels = torch.randint(0, cfg.vocab_size, (BATCH, s), generator=g)
    loss_mask = torch.ones(BATCH, s)
    loss_mask[:, cfg.num_positions(GRID):] = 0
    loss_mask[1, :4] = 0
    context = torch.randn(BATCH, CTX, cfg.context_dim, generator=g)
    context_mask = torch.ones(BATCH, CTX, dtype=torch.bool)
    context_mask[0, CTX // 2:] = False
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, context=context, context_mask=context_mask)


def _run(model, b):
    return model(b["tokens"], GRID, b["context"], b["context_mask"], labels=b["labels"], loss_mask=b["loss_mask"])


def _loss(per_token, b):
    return per_token.sum() / b["loss_mask"].sum()


def _model_tensors(sharded: dict) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {k: v for k, v in sharded.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}


# ---------------------------------------------------------------- worker (under torchrun)
def _worker(work: Path) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_ext.models.ar.model import CosmosAR, build_transformer_config
    from nemo_ext.training.strategy import init_distributed, init_model_parallel

    init_distributed("cpu")
    init_model_parallel(types.SimpleNamespace(tp=TP, pp=PP, cp=1), seed=0)
    cfg = _cfg()
    layout = types.SimpleNamespace(tp=TP, pp=PP, cp=1, sequence_parallel=True, recompute=None)
    config = build_transformer_config(cfg, layout, torch.float32)
    model = CosmosAR(config, cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    loaded = dist_checkpointing.load(_model_tensors(model.sharded_state_dict()), str(work / "weights"))
    loaded.pop("content_metadata", None)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    batch = _batch(cfg)

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = _run(chunk, b)

        def loss_func(per_token):
            loss = _loss(per_token, b)
            return loss, {"loss": loss.detach().clone(), "per_token": per_token.detach().clone()}

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp], num_microbatches=1,
        seq_length=batch["tokens"].shape[1], micro_batch_size=BATCH, forward_only=False,
    )
    finalize_model_grads([ddp])
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save({"loss": losses[0]["loss"], "per_token": losses[0]["per_token"]}, work / "loss.pt")
    with torch.no_grad():  # gradients as the weights of a checkpoint: the test reads them whole
        for p in model.parameters():
            p.copy_(p.main_grad)
    if torch.distributed.get_rank() == 0:
        (work / "grads").mkdir()
    torch.distributed.barrier()
    dist_checkpointing.save(_model_tensors(model.sharded_state_dict()), str(work / "grads"))
    torch.distributed.barrier()

    # The same world re-laid out as TP2 x DP2 (no SP): KV-cache generation with the logits gathered
    # over TP, every rank sampling with the same generator seed.
    from nemo_ext.models.ar.generate import generate

    ps.destroy_model_parallel()
    init_model_parallel(types.SimpleNamespace(tp=TP, pp=1, cp=1), seed=0)
    layout = types.SimpleNamespace(tp=TP, pp=1, cp=1, sequence_parallel=False, recompute=None)
    model = CosmosAR(build_transformer_config(cfg, layout, torch.float32), cfg)
    loaded = dist_checkpointing.load(_model_tensors(model.sharded_state_dict()), str(work / "weights"))
    loaded.pop("content_metadata", None)
    model.load_state_dict(loaded, strict=False)
    out = _generate(generate, model, batch)
    if torch.distributed.get_rank() == 0:
        torch.save(out, work / "generate.pt")
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


SAMPLING = {"greedy": dict(temperature=0.0), "top_k": dict(temperature=1.0, top_k=50)}


def _generate(generate, model, b) -> dict:
    return {
        name: generate(model, b["tokens"][:, :9], GRID, 12, b["context"], generator=torch.Generator().manual_seed(7),
                       context_mask=b["context_mask"], **kw)
        for name, kw in SAMPLING.items()
    }


# ---------------------------------------------------------------- test (pytest process)
@pytest.fixture(scope="module")
def runs(tmp_path_factory, megatron_world):
    from nemo_ext.checkpoint.cosmos_ar import ar_template, write_ar_checkpoint
    from nemo_ext.models.ar.model import CosmosAR, build_transformer_config

    work = tmp_path_factory.mktemp("ar_parallel")
    cfg = _cfg()
    layout = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None)
    model = CosmosAR(build_transformer_config(cfg, layout, torch.float32), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms around 1, every matrix non-zero
            base, std = (1.0, 0.1) if "norm" in name else (0.0, 0.08)
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    write_ar_checkpoint(ar_template(cfg, torch.float32, prefix=""), weights, work / "weights", content_metadata={},
                        key_prefix="")
    batch = _batch(cfg)
    per_token = _run(model, batch)
    loss = _loss(per_token, batch)
    loss.backward()
    from nemo_ext.models.ar.generate import generate

    reference = {"loss": loss.detach(), "per_token": per_token.detach(),
                 "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                 "generate": _generate(generate, model, batch)}

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TP * PP}", __file__, str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))  # the workers' tracebacks
    assert proc.returncode == 0, f"TP2xPP2 world failed:\n{proc.stdout[-2000:]}\n{ranks[-8000:] or proc.stderr[-8000:]}"
    return work, reference


def test_tp2_pp2_sp_loss_equals_single_process(runs):
    work, ref = runs
    got = torch.load(work / "loss.pt", weights_only=True)
    torch.testing.assert_close(got["per_token"], ref["per_token"], rtol=1e-5, atol=1e-5)
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)


def test_tp2_pp2_sp_gradients_equal_single_process(runs):
    from nemo_ext.checkpoint.plain import read_tensors, unstack_layers

    work, ref = runs
    grads = unstack_layers(read_tensors(work / "grads"), prefix="")
    assert sorted(grads) == sorted(ref["grads"])
    for name, expected in ref["grads"].items():
        assert expected.abs().max() > 0, name  # every parameter is in the comparison
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_tp2_generation_with_kv_cache_equals_single_process(runs):
    work, ref = runs
    got = torch.load(work / "generate.pt", weights_only=True)
    for name in SAMPLING:
        assert torch.equal(got[name], ref["generate"][name]), name


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
