"""LoRA at TP2 x PP2 with sequence parallelism equals LoRA in one process, for both families.

One torchrun world of 4 gloo processes (spawned once for the module; this file is its worker
script) builds each family's model with LoRA adapters (every attention and MLP linear; the AR
output layer too), loads the weights of a single-process reference (base *and* adapters, with
non-zero ``B``) through megatron's dist_checkpointing (resharding them: the adapters' own sharded
layout, a SwiGLU fc1's ``B`` as its two halves), runs one forward/backward through megatron's
pipeline schedule and ``finalize_model_grads`` (DDP grad buffers holding the adapters only, the
replicated adapter matrices' SP grads summed over TP), and writes its loss and the adapter
gradients as a sharded checkpoint, which the test reads back as global tensors. Then every rank
merges its adapters into its weight slices and runs the forward again: the merged TP2 x PP2 model
computes the single-process adapted loss.
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
FAMILIES = ("diffusion", "ar")
RANK, ALPHA = 4, 8.0
AR_GRID = (3, 4, 4)


def _targets(family):
    return ["*attention.linear_*", "mlp.linear_*"] + (["output_layer"] if family == "ar" else [])


def _dit_cfg():
    from nemo_ext.models.dit.config import DiTConfig

    return DiTConfig(num_layers=4, hidden_size=64, num_attention_heads=4, adaln_lora_dim=16, context_dim=32,
                     max_size=[8, 16, 16], attention_backend="math")


def _ar_cfg():
    from nemo_ext.models.ar.config import ARConfig
    from nemo_ext.tokenizers.discrete import DiscreteTokenizerConfig

    return ARConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    max_size=[4, 8, 8], context_dim=32, cross_attention=True, bov_token=True, abs_pos_emb="learnable",
                    attention_backend="math", name="tiny", tokenizer=DiscreteTokenizerConfig(levels=[8, 5, 5, 5]))


def _build(family, layout):
    """The family's model with LoRA on this rank's pipeline stage; only the adapters train."""
    from megatron.core import parallel_state as ps

    from nemo_ext.models.lora import apply_lora, freeze_base

    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if family == "diffusion":
        from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config
        from nemo_ext.models.world_model import WorldModel
        from nemo_ext.tasks.general import TextConditioner

        cfg = _dit_cfg()
        config = build_transformer_config(cfg, layout, torch.float32)
        model = WorldModel(config, CosmosDiT(config, cfg, pre_process=first, post_process=last), TextConditioner())
    else:
        from nemo_ext.models.ar.model import CosmosAR, build_transformer_config

        cfg = _ar_cfg()
        model = CosmosAR(build_transformer_config(cfg, layout, torch.float32), cfg, pre_process=first, post_process=last)
    apply_lora(model, RANK, ALPHA, 0.0, _targets(family), seed=0)
    assert not freeze_base(model, [])
    return model


def _batch(family) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "diffusion":  # 2 x 4 x 4 = 32 tokens and an 8-token context: both split over TP
        return dict(x=torch.randn(2, 16, 2, 8, 8, generator=g), t=torch.rand(2, generator=g),
                    context=torch.randn(2, 8, 32, generator=g), target=torch.randn(2, 16, 2, 8, 8, generator=g))
    cfg = _ar_cfg()
    s = cfg.seq_length(AR_GRID, multiple=TP)
    tokens = torch.randint(0, cfg.vocab_size, (2, s), generator=g)
    tokens[:, 0] = cfg.bov_id
    labels = torch.randint(0, cfg.vocab_size, (2, s), generator=g)
    loss_mask = torch.ones(2, s)
    loss_mask[:, cfg.num_positions(AR_GRID):] = 0
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, context=torch.randn(2, 8, cfg.context_dim, generator=g))


def _run(family, model, b):
    if family == "diffusion":
        return model(b["x"], b["t"], {"context": b["context"]})
    return model(b["tokens"], AR_GRID, b["context"], labels=b["labels"], loss_mask=b["loss_mask"])


def _loss(family, out, b):
    if family == "diffusion":
        return (out.float() - b["target"]).pow(2).mean()
    return out.sum() / b["loss_mask"].sum()


def _tensors(sharded: dict, keep=None) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {k: v for k, v in sharded.items()
            if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and (keep is None or k in keep)}


# ---------------------------------------------------------------- worker (under torchrun)
def _worker(work: Path) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_ext.models.lora import merge_lora_
    from nemo_ext.training.strategy import init_distributed, init_model_parallel

    init_distributed("cpu")
    init_model_parallel(types.SimpleNamespace(tp=TP, pp=PP, cp=1), seed=0)
    layout = types.SimpleNamespace(tp=TP, pp=PP, cp=1, sequence_parallel=True, recompute=None,
                                   recompute_method="uniform", recompute_num_layers=1)
    rank0 = torch.distributed.get_rank() == 0
    for family in FAMILIES:
        model = _build(family, layout)
        loaded = dist_checkpointing.load(_tensors(model.sharded_state_dict()), str(work / f"{family}_weights"))
        loaded.pop("content_metadata", None)
        missing, unexpected = model.load_state_dict(loaded, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        batch = _batch(family)

        def forward_step(data_iterator, chunk, family=family):
            b = next(data_iterator)
            out = _run(family, chunk, b)

            def loss_func(output):
                loss = _loss(family, output, b)
                return loss, {"loss": loss.detach().clone()}

            return out, loss_func

        def schedule(forward_only):
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp], num_microbatches=1,
                seq_length=(32 if family == "diffusion" else batch["tokens"].shape[1]), micro_batch_size=2,
                forward_only=forward_only,
            )

        losses = schedule(forward_only=False)
        finalize_model_grads([ddp])
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():  # the adapters' gradients as the weights of a checkpoint: read whole by the test
            saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(p.main_grad)
        if rank0:
            (work / f"{family}_grads").mkdir()
        torch.distributed.barrier()
        dist_checkpointing.save(_tensors(model.sharded_state_dict(), trained), str(work / f"{family}_grads"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
            merge_lora_(model)
        merged = schedule(forward_only=True)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            torch.save({"loss": losses[0]["loss"], "merged": merged[0]["loss"]}, work / f"{family}_loss.pt")
        torch.distributed.barrier()
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- test (pytest process)
@pytest.fixture(scope="module")
def runs(tmp_path_factory, megatron_world):
    from megatron.core import dist_checkpointing

    from nemo_ext.models.lora import adapters_of

    work = tmp_path_factory.mktemp("lora_parallel")
    layout = types.SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, recompute=None,
                                   recompute_method="uniform", recompute_num_layers=1)
    reference = {}
    for family in FAMILIES:
        model = _build(family, layout)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a pretrained-like base (every matrix non-zero, AdaLN gates open) and trained B
            for name, p in model.named_parameters():
                base, std = (1.0, 0.1) if "norm" in name else (0.0, 0.08)
                p.copy_(base + std * torch.randn(p.shape, generator=g))
        assert all(a.lora_b.abs().max() > 0 for a in adapters_of(model).values())
        (work / f"{family}_weights").mkdir()
        dist_checkpointing.save(_tensors(model.sharded_state_dict()), str(work / f"{family}_weights"))
        batch = _batch(family)
        loss = _loss(family, _run(family, model, batch), batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all("_lora.lora_" in n for n in grads)
        reference[family] = {"loss": loss.detach(), "grads": grads}

    # The worker is a script: put this checkout first on its path (not another installed copy).
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TP * PP}", __file__, str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))
    assert proc.returncode == 0, f"TP2xPP2 world failed:\n{proc.stdout[-2000:]}\n{ranks[-8000:] or proc.stderr[-8000:]}"
    return work, reference


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_pp2_sp_lora_loss_and_merged_loss_equal_single_process(runs, family):
    work, ref = runs
    got = torch.load(work / f"{family}_loss.pt", weights_only=True)
    assert got["loss"].item() == pytest.approx(ref[family]["loss"].item(), rel=1e-5)
    assert got["merged"].item() == pytest.approx(ref[family]["loss"].item(), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_pp2_sp_lora_gradients_equal_single_process(runs, family):
    from nemo_ext.checkpoint.plain import read_tensors, unstack_layers

    work, ref = runs
    grads = unstack_layers(read_tensors(work / f"{family}_grads"), prefix="")
    expected = ref[family]["grads"]
    assert sorted(grads) == sorted(expected)  # exactly the adapters: the frozen base has no gradient
    for name, value in expected.items():
        assert value.abs().max() > 0, name
        torch.testing.assert_close(grads[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
