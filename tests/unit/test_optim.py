"""megatron's optimizer as the trainer builds it (``nemo_ext.training.optim.build_optimizer``):
torch's fused Adam kernel (``optim.fused``, the default) takes the same steps as torch's multi-tensor
implementation, with and without the distributed optimizer, and its state survives a save/load."""

from __future__ import annotations

import copy

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ddp(distributed_optimizer: bool, seed: int = 0):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import MegatronModule, TransformerConfig

    class Net(MegatronModule):
        def __init__(self, config):
            super().__init__(config)
            self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    torch.manual_seed(seed)
    net = Net(config).to(DEVICE)  # where megatron_world put the process group (the GPU when there is one)
    return net, DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer), net)


def _optimizer(ddp, distributed_optimizer: bool, fused: bool):
    from nemo_ext.config.schema import OptimConfig, ParallelConfig
    from nemo_ext.training.optim import build_optimizer

    return build_optimizer(OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused),
                           ParallelConfig(distributed_optimizer=distributed_optimizer), [ddp], torch.float32)


def _steps(net, ddp, opt, steps, start=0):
    from megatron.core.distributed import finalize_model_grads

    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(torch.randn(16, 8, generator=g).to(DEVICE)).pow(2).mean().backward()
        finalize_model_grads([ddp])
        assert opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _inner_adams(opt):
    from nemo_ext.training.optim import _torch_adams

    return [inner for _, inner in _torch_adams(opt.mcore)]


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_fused_adam_takes_the_multi_tensor_steps(megatron_world, distributed_optimizer):
    results = {}
    for fused in (True, False):
        net, ddp = _ddp(distributed_optimizer)
        opt = _optimizer(ddp, distributed_optimizer, fused)
        adams = _inner_adams(opt)
        assert adams and all(bool(g["fused"]) is fused for a in adams for g in a.param_groups)
        results[fused] = _steps(net, ddp, opt, 3)
        for adam in adams:
            for p, state in adam.state.items():
                step = state["step"]
                assert float(step) == 3.0
                if fused:  # the fused kernel keeps its counters on the parameters' device, in fp32
                    assert step.device == p.device and step.dtype == torch.float32
    moved = [n for n, p in results[True].items() if not torch.equal(p, _ddp(distributed_optimizer)[0].state_dict()[n])]
    assert moved == list(results[True])  # every parameter trained
    for name, value in results[True].items():
        torch.testing.assert_close(value, results[False][name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_adam_state_survives_a_save_and_load(megatron_world):
    """A checkpoint's optimizer state (saved by a fused or a multi-tensor optimizer) loads into a
    fused one, which then steps exactly as the optimizer that saved it."""
    for saved_fused in (True, False):
        net, ddp = _ddp(False)
        opt = _optimizer(ddp, False, saved_fused)
        _steps(net, ddp, opt, 2)
        state = copy.deepcopy(opt.state_dict())
        weights = copy.deepcopy(net.state_dict())
        expected = _steps(net, ddp, opt, 2, start=2)

        net2, ddp2 = _ddp(False, seed=1)
        net2.load_state_dict(weights)
        opt2 = _optimizer(ddp2, False, True)
        opt2.load_state_dict(state)
        for adam in _inner_adams(opt2):  # still fused, whatever saved the state, counters where the kernel reads them
            assert all(g["fused"] for g in adam.param_groups)
            assert all(s["step"].device == p.device and s["step"].dtype == torch.float32 for p, s in adam.state.items())
        got = _steps(net2, ddp2, opt2, 2, start=2)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} (saved fused={saved_fused})")
